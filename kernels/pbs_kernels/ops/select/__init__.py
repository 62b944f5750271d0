"""Select key blocks per query block: top-p over earlier segments + own segment + sink."""
from .._common import MAX_ROW, resolve_backend
from .naive import select_blocks_naive, topp_keep


def select_blocks(q, k_perm, pos, settings, *, key_stats=None, packed=None):
    """Kept key blocks per query block (a `pbs_kernels.blocks.BlockList`), by the rule and knobs
    of `settings` (a `pbs_kernels.settings.PbsSettings`: block_size, segment_size, threshold,
    scale, window, estimator, threshold_mass; its backend picks Triton or torch, "auto" per
    tensor). Both backends work on pooled [NQB, NKB] block scores, O(N^2 / b^2), never N x N.
    `key_stats` (from `gather_permuted(..., block_stats=True)`) spares the Triton path a pass
    over K; the torch reference recomputes. q may hold the last M of the N key positions.

    packed (a `pbs_kernels.packing.PackedLayout`): a packed batch, q [1, HQ, total_q, D] in
    packed rows, k_perm / pos in virtual slots, one list row per virtual block (naive.py)."""
    if resolve_backend(settings.backend, q) == "triton":
        if packed is not None:
            from .fused import select_blocks_packed_triton

            return select_blocks_packed_triton(q, k_perm, pos, packed, settings, key_stats=key_stats)
        from .fused import select_blocks_triton

        blocks = select_blocks_triton(q, k_perm, pos, settings, key_stats=key_stats)
        if blocks is not None:
            return blocks
    return select_blocks_naive(q, k_perm, pos, settings, packed=packed)


__all__ = ["MAX_ROW", "select_blocks", "select_blocks_naive", "topp_keep"]
