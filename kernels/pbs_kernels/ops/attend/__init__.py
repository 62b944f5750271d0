"""Permuted block-sparse flash forward over the kept tiles."""
import torch

from .._common import resolve_backend
from .naive import attend_blocks_naive, attend_naive


def attend(q, k_perm, v_perm, pos, blocks, *, scale: float, backend: str = "torch", return_lse: bool = False,
           window=None, sinks=None, softcap=None, vertical_keys: int = 0, segment_size: int | None = None,
           packed=None, out=None):
    """q [B, HQ, M, D] (the last M of the N key positions), K/V in slot order [B, H, N, D];
    optional sliding `window`, per-head `sinks` [HQ], `softcap` and `vertical_keys` (with the
    plan's `segment_size`; see naive.py). `backend`: "triton", "torch" or "auto" (per tensor).

    packed (a `pbs_kernels.packing.PackedLayout`): a packed batch, q [1, HQ, total_q, D] in
    packed rows, K/V and pos in virtual slots, one block-list row per virtual block; the output
    is in packed rows, and with `out` (like q) only the layout's rows of `out` are written (in
    out's dtype). No LSE and no vertical keys for a packed batch."""
    backend = resolve_backend(backend, q)
    extra = dict(window=window, sinks=sinks, softcap=softcap)
    if packed is not None:
        if return_lse or vertical_keys:
            raise ValueError("attend: a packed batch returns no LSE and has no vertical keys")
        if backend == "triton":
            from .fwd import attend_packed_triton

            return attend_packed_triton(q, k_perm, v_perm, pos, blocks, packed,
                                        out=torch.empty_like(q) if out is None else out, scale=scale, **extra)
        from .naive import attend_packed_naive

        res = attend_packed_naive(q, k_perm, v_perm, pos, blocks, packed, scale=scale, **extra)
        if out is None:
            return res.to(q.dtype)
        rows = packed.q_rows(q.device)
        out[:, :, rows] = res[:, :, rows].to(out.dtype)
        return out
    extra.update(vertical_keys=vertical_keys, segment_size=segment_size)
    if backend == "triton":
        from .fwd import attend_triton

        return attend_triton(q, k_perm, v_perm, pos, blocks, scale=scale, return_lse=return_lse, out=out, **extra)
    res = attend_naive(q, k_perm, v_perm, pos, blocks, scale=scale, return_lse=return_lse, **extra)
    if out is None:
        return res
    o, lse = res if return_lse else (res, None)
    out.copy_(o)
    return (out, lse) if return_lse else out


__all__ = ["attend", "attend_blocks_naive", "attend_naive"]
