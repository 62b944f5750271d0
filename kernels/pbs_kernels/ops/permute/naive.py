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


def sort_within_segments(scores: torch.Tensor, segment_size: int,
                         sort: torch.Tensor | None = None) -> torch.Tensor:
    """Original position of each permuted slot: keys sorted by descending score inside each full
    segment (ties keep their original order); a trailing partial segment stays as it is, and so
    does every segment s with sort[s] == 0 when `sort` [N // segment_size] is given (packed
    batches: dense sequences and the padded last segment of each sequence).

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
        sorted_order = (local + start).reshape(B, H, n_full)
        if sort is not None:
            keep = (sort[:n_seg] != 0).repeat_interleave(segment_size)
            sorted_order = torch.where(keep, sorted_order, order[..., :n_full])
        order[..., :n_full] = sorted_order
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


def score_keys_packed_naive(q: torch.Tensor, k: torch.Tensor, layout, *, block_size: int,
                            scale: float) -> torch.Tensor:
    """Packed batches: every sorted sequence's keys scored by its own last query block, at their
    virtual positions. q [1, HQ, total_q, D], k [1, H, total_k, D] (packed rows) ->
    [1, H, n_virtual] float32 (0 where nothing is sorted)."""
    out = torch.zeros(1, k.shape[1], layout.n_virtual, device=k.device, dtype=torch.float32)
    for s in layout.scored:
        out[:, :, s.offset:s.offset + s.n] = score_keys_naive(q[:, :, s.q0:s.q1], k[:, :, s.k0:s.k1],
                                                              block_size=block_size, scale=scale)
    return out


def packed_rows(pos: torch.Tensor, layout):
    """Packed K row of each virtual slot and whether the slot holds a key: pos [1, H, n_virtual]
    virtual positions -> (rows [1, H, n_virtual] int64, valid bool, same shape)."""
    from ...packing import KDELTA, slot_valid

    blk = torch.arange(pos.shape[-1], device=pos.device) // layout.block_size
    delta = layout.blk[KDELTA].long()[blk]
    valid = slot_valid(pos, layout)
    return torch.where(valid, pos.long() + delta, 0), valid


def gather_keys_packed(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, layout):
    """K and V of packed rows [1, H, total_k, D] in virtual slot order `pos` [1, H, n_virtual];
    slots with no key (padding) get zero rows."""
    rows, valid = packed_rows(pos, layout)
    index = rows[..., None].expand(-1, -1, -1, k.shape[-1])
    keep = valid[..., None]
    return (torch.where(keep, torch.gather(k, 2, index), 0).to(k.dtype),
            torch.where(keep, torch.gather(v, 2, index), 0).to(v.dtype))
