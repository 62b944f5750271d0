"""Permute keys inside segments by the attention they receive from the last query block."""
from __future__ import annotations

import torch

from .naive import gather_keys, permute_keys_naive, score_keys_naive, sort_within_segments


def score_keys(q, k, *, block_size: int, scale: float, backend: str = "torch") -> torch.Tensor:
    if backend == "triton" and q.shape[2] >= block_size:
        from .score import score_keys_triton

        return score_keys_triton(q, k, block_size=block_size, scale=scale)
    return score_keys_naive(q, k, block_size=block_size, scale=scale)


def permute_keys(q, k, v, *, block_size: int, segment_size: int, scale: float, backend: str = "torch",
                 block_stats: bool = False):
    """Returns (k_perm, v_perm, pos): K and V with the keys of every full segment sorted by
    descending score, and pos [B, H, N] int32, the original position of each permuted slot.
    With `block_stats=True` a fourth item: `key_block_stats(k_perm, pos, block_size)`, which
    selection takes as `key_stats`.

    On the "triton" backend scoring, the segment sort and the K/V row gather (which also pools
    the key blocks) are Triton kernels; the "torch" backend is the plain reference.
    """
    B, HQ, N, _ = q.shape
    H = k.shape[1]
    if backend == "triton" and N >= block_size and k.stride(-1) == 1 and v.stride(-1) == 1:
        from .gather import gather_keys_triton
        from .order import segment_order_triton
        from .score import score_keys_per_head

        per_head = score_keys_per_head(q, k, block_size=block_size, scale=scale)
        pos = segment_order_triton(per_head, B, H, N, segment_size)
        if block_stats:
            k_p, v_p, stats = gather_keys_triton(k, v, pos, pool_block=block_size)
            return k_p, v_p, pos, stats
        k_p, v_p = gather_keys_triton(k, v, pos)
        return k_p, v_p, pos
    scores = score_keys(q, k, block_size=block_size, scale=scale, backend=backend)
    order = sort_within_segments(scores, segment_size)
    k_p, v_p = gather_keys(k, v, order)  # torch.gather wants int64 indices
    pos = order.to(torch.int32)
    if block_stats:
        from ...blocks import key_block_stats

        return k_p, v_p, pos, key_block_stats(k_p, pos, block_size)
    return k_p, v_p, pos


__all__ = ["permute_keys", "permute_keys_naive", "score_keys", "score_keys_naive"]
