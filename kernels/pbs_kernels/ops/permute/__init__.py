"""Permute keys inside segments by the attention they receive from the last query block."""
from __future__ import annotations

import torch

from .naive import gather_keys, permute_keys_naive, score_keys_naive, sort_within_segments


def score_keys(q, k, *, block_size: int, scale: float, backend: str = "torch") -> torch.Tensor:
    if backend == "triton" and q.shape[2] >= block_size:
        from .score import score_keys_triton

        return score_keys_triton(q, k, block_size=block_size, scale=scale)
    return score_keys_naive(q, k, block_size=block_size, scale=scale)


def permute_keys(q, k, v, *, block_size: int, segment_size: int, scale: float, backend: str = "torch"):
    """Returns (k_perm, v_perm, pos): K and V with the keys of every full segment sorted by
    descending score, and pos [B, H, N] int32, the original position of each permuted slot.

    On the "triton" backend scoring and the K/V row gather are Triton kernels; sorting (segments
    are short) is a torch op on both backends.
    """
    scores = score_keys(q, k, block_size=block_size, scale=scale, backend=backend)
    order = sort_within_segments(scores, segment_size)
    pos = order.to(torch.int32)
    if backend == "triton" and k.stride(-1) == 1 and v.stride(-1) == 1:
        from .gather import gather_keys_triton

        k_p, v_p = gather_keys_triton(k, v, pos)
    else:
        k_p, v_p = gather_keys(k, v, order)  # torch.gather wants int64 indices
    return k_p, v_p, pos


__all__ = ["permute_keys", "permute_keys_naive", "score_keys", "score_keys_naive"]
