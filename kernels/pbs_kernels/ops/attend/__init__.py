"""Permuted block-sparse flash forward over the kept tiles."""
from .naive import attend_blocks_naive, attend_naive


def attend(q, k_perm, v_perm, pos, blocks, *, scale: float, backend: str = "torch", return_lse: bool = False):
    if backend == "triton":
        from .fwd import attend_triton

        return attend_triton(q, k_perm, v_perm, pos, blocks, scale=scale, return_lse=return_lse)
    return attend_naive(q, k_perm, v_perm, pos, blocks, scale=scale, return_lse=return_lse)


__all__ = ["attend", "attend_blocks_naive", "attend_naive"]
