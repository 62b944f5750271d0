"""Permuted block-sparse flash forward over the kept tiles."""
from .naive import attend_blocks_naive, attend_naive


def attend(q, k_perm, v_perm, pos, blocks, *, scale: float, backend: str = "torch", return_lse: bool = False,
           window=None, sinks=None, softcap=None, vertical_keys: int = 0, segment_size: int | None = None):
    """q [B, HQ, M, D] (the last M of the N key positions), K/V in slot order [B, H, N, D];
    optional sliding `window`, per-head `sinks` [HQ], `softcap` and `vertical_keys` (with the
    plan's `segment_size`; see naive.py)."""
    extra = dict(window=window, sinks=sinks, softcap=softcap, vertical_keys=vertical_keys, segment_size=segment_size)
    if backend == "triton":
        from .fwd import attend_triton

        return attend_triton(q, k_perm, v_perm, pos, blocks, scale=scale, return_lse=return_lse, **extra)
    return attend_naive(q, k_perm, v_perm, pos, blocks, scale=scale, return_lse=return_lse, **extra)


__all__ = ["attend", "attend_blocks_naive", "attend_naive"]
