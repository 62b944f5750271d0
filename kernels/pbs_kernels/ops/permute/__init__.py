"""Permute keys inside segments by the attention they receive from the last query block."""
from __future__ import annotations

import torch

from .._common import resolve_backend
from .naive import gather_keys, permute_keys_naive, score_keys_naive, sort_within_segments


def score_keys(q, k, *, block_size: int, scale: float, backend: str = "torch") -> torch.Tensor:
    if backend == "triton" and q.shape[2] >= block_size and k.shape[2] >= block_size:
        from .score import score_keys_triton

        return score_keys_triton(q, k, block_size=block_size, scale=scale)
    return score_keys_naive(q, k, block_size=block_size, scale=scale)


def segment_order(q, k, *, block_size: int, segment_size: int, scale: float, backend: str = "torch",
                  prefix_pos: torch.Tensor | None = None, packed=None) -> torch.Tensor:
    """Original position of each slot [B, H, N] int32: the keys of every full segment sorted by
    the attention they get from the last block of q (q: the last M of k's N positions).

    prefix_pos [B, H, P] (P a multiple of segment_size, P <= N - M): the order of completed
    segments from an earlier call (a previous chunk of the same prompt). Those segments keep it
    and only keys P .. N - 1 are scored, with the softmax taken over those keys alone, so a
    chunk costs O(M + segment) scored keys instead of O(N) (docs/serving.md).

    packed (a `pbs_kernels.packing.PackedLayout`): a packed batch, q [1, HQ, total_q, D] and k
    [1, H, total_k, D] in packed rows; each sorted sequence's keys are scored by its own last
    query block and the result holds virtual positions [1, H, n_virtual] (dense sequences and
    each sequence's padded last segment keep their order).
    """
    backend = resolve_backend(backend, q)
    if packed is not None:
        return _segment_order_packed(q, k, packed, block_size=block_size, segment_size=segment_size, scale=scale,
                                     backend=backend)
    B, HQ, M, _ = q.shape
    H, N = k.shape[1], k.shape[2]
    p0 = 0 if prefix_pos is None else prefix_pos.shape[-1]
    ks = k[:, :, p0:] if p0 else k
    if backend == "triton" and M >= block_size and ks.stride(-1) == 1:
        from .order import segment_order_triton
        from .score import score_keys_per_head

        per_head = score_keys_per_head(q, ks, block_size=block_size, scale=scale)
        pos = segment_order_triton(per_head, B, H, N - p0, segment_size)
    else:
        scores = score_keys(q, ks, block_size=block_size, scale=scale, backend=backend)
        pos = sort_within_segments(scores, segment_size).to(torch.int32)
    if p0:
        pos = torch.cat([prefix_pos.to(torch.int32), pos + p0], dim=2).contiguous()
    return pos


def _segment_order_packed(q, k, layout, *, block_size: int, segment_size: int, scale: float, backend: str):
    H, nv = k.shape[1], layout.n_virtual
    if not layout.n_scored:
        from ...blocks import identity_positions

        return identity_positions(1, H, nv, q.device)
    if backend == "triton":
        from .order import segment_order_triton
        from .score import score_keys_packed_triton

        per_head = score_keys_packed_triton(q, k, layout, block_size=block_size, scale=scale)
        return segment_order_triton(per_head, 1, H, nv, segment_size, sort=layout.seg_sort)
    from .naive import score_keys_packed_naive

    scores = score_keys_packed_naive(q, k, layout, block_size=block_size, scale=scale)
    return sort_within_segments(scores, segment_size, layout.seg_sort).to(torch.int32)


def gather_permuted(k, v, pos, *, block_size: int, backend: str = "torch", block_stats: bool = False,
                    packed=None):
    """K and V in the slot order `pos` (and with `block_stats` the pooled keys and earliest
    position per block, `key_block_stats`).

    packed (a `pbs_kernels.packing.PackedLayout`): k, v are packed rows [1, H, total_k, D] and
    pos holds virtual positions [1, H, n_virtual]; K/V come back in virtual slots (zero rows for
    padding). The block statistics come from the Triton gather only (None from torch: the
    reference selection computes its own)."""
    backend = resolve_backend(backend, k)
    if packed is not None:
        if backend == "triton":
            from .gather import gather_keys_triton

            return gather_keys_triton(k, v, pos, pool_block=block_size, packed=packed)
        from .naive import gather_keys_packed

        return (*gather_keys_packed(k, v, pos, packed), None)
    if backend == "triton" and k.stride(-1) == 1 and v.stride(-1) == 1:
        from .gather import gather_keys_triton

        if block_stats:
            return gather_keys_triton(k, v, pos, pool_block=block_size)
        return (*gather_keys_triton(k, v, pos), None)
    k_p, v_p = gather_keys(k, v, pos.long())  # torch.gather wants int64 indices
    if block_stats:
        from ...blocks import key_block_stats

        return k_p, v_p, key_block_stats(k_p, pos, block_size)
    return k_p, v_p, None


def permute_keys(q, k, v, *, block_size: int, segment_size: int, scale: float, backend: str = "torch",
                 block_stats: bool = False, prefix_pos: torch.Tensor | None = None):
    """Returns (k_perm, v_perm, pos): K and V with the keys of every full segment sorted by
    descending score, and pos [B, H, N] int32, the original position of each permuted slot.
    With `block_stats=True` a fourth item: `key_block_stats(k_perm, pos, block_size)`, which
    selection takes as `key_stats`. q may hold the last M of the N positions; `prefix_pos`:
    see `segment_order`.

    On the "triton" backend scoring, the segment sort and the K/V row gather (which also pools
    the key blocks) are Triton kernels; the "torch" backend is the plain reference.
    """
    pos = segment_order(q, k, block_size=block_size, segment_size=segment_size, scale=scale, backend=backend,
                        prefix_pos=prefix_pos)
    k_p, v_p, stats = gather_permuted(k, v, pos, block_size=block_size, backend=backend, block_stats=block_stats)
    if block_stats:
        return k_p, v_p, pos, stats
    return k_p, v_p, pos


__all__ = ["gather_permuted", "permute_keys", "permute_keys_naive", "score_keys", "score_keys_naive",
           "segment_order"]
