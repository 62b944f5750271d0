"""Select key blocks per query block: top-p over earlier segments + own segment + sink."""
from .naive import select_blocks_naive, topp_keep


def select_blocks(q, k_perm, pos, *, block_size: int, segment_size: int, threshold: float,
                  scale: float, backend: str = "torch", key_stats=None, estimator: str = "mean",
                  threshold_mass: str = "earlier", window: int | None = None):
    """Kept key blocks per query block (a `pbs_kernels.blocks.BlockList`). Both backends work on
    pooled [NQB, NKB] block scores, O(N^2 / b^2), never N x N. `key_stats` (from
    `permute_keys(..., block_stats=True)`) spares the Triton path a pass over K; the torch
    reference recomputes. `estimator` and `threshold_mass`: see `pbs_kernels.limits`. q may hold
    the last M of the N key positions; `window` is a sliding window (q_pos - window < k_pos <= q_pos)."""
    if backend == "triton":
        from .fused import select_blocks_triton

        blocks = select_blocks_triton(q, k_perm, pos, block_size=block_size, segment_size=segment_size,
                                      threshold=threshold, scale=scale, key_stats=key_stats,
                                      estimator=estimator, threshold_mass=threshold_mass, window=window)
        if blocks is not None:
            return blocks
    return select_blocks_naive(q, k_perm, pos, block_size=block_size, segment_size=segment_size,
                               threshold=threshold, scale=scale, estimator=estimator,
                               threshold_mass=threshold_mass, window=window)


__all__ = ["select_blocks", "select_blocks_naive", "topp_keep"]
