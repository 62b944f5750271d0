"""Plain-torch reference of the key permutation (docs/design.md, "The method", step 1)."""
from __future__ import annotations

import torch


def score_keys_naive(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float) -> torch.Tensor:
    """Attention each key receives from the last `block_size` queries, averaged over those queries
    and over the query heads that share the key's KV head.

    q: [B, HQ, Mq, D] (the last Mq of the N positions), k: [B, H, N, D] -> [B, H, N] float32.
    With Mq < block_size all Mq queries score.
    """
    B, HQ, Mq, D = q.shape
    H, N = k.shape[1], k.shape[2]
    G = HQ // H
    M = min(block_size, Mq)
    q_last = q[:, :, Mq - M:].float().reshape(B, H, G, M, D)
    # [B, H, G, M, N]
    s = torch.einsum("bhgmd,bhnd->bhgmn", q_last, k.float()) * scale
    q_pos = torch.arange(N - M, N, device=q.device)
    k_pos = torch.arange(N, device=q.device)
    s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(s, dim=-1).mean(dim=(2, 3))


def sort_within_segments(scores: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Original position of each permuted slot: keys sorted by descending score inside each full
    segment (ties keep their original order); a trailing partial segment stays as it is.

    scores: [B, H, N] -> [B, H, N] int64.
    """
    B, H, N = scores.shape
    order = torch.arange(N, device=scores.device).expand(B, H, N).clone()
    n_seg = N // segment_size
    n_full = n_seg * segment_size
    if n_seg:
        seg = scores[..., :n_full].reshape(B, H, n_seg, segment_size)
        local = torch.sort(seg, dim=-1, descending=True, stable=True).indices
        start = torch.arange(n_seg, device=scores.device)[:, None] * segment_size
        order[..., :n_full] = (local + start).reshape(B, H, n_full)
    return order


def gather_keys(k: torch.Tensor, v: torch.Tensor, order: torch.Tensor):
    """K and V in permuted order. order: [B, H, N] original position of each slot."""
    index = order[..., None].expand(-1, -1, -1, k.shape[-1])
    return torch.gather(k, 2, index), torch.gather(v, 2, index)


def permute_keys_naive(q, k, v, *, block_size: int, segment_size: int, scale: float):
    scores = score_keys_naive(q, k, block_size=block_size, scale=scale)
    order = sort_within_segments(scores, segment_size)
    k_p, v_p = gather_keys(k, v, order)
    return k_p, v_p, order.to(torch.int32)
