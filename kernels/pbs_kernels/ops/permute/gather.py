"""Triton row gather: K and V in permuted order in one pass (each slot copies one D-wide row).

torch.gather on [B, H, N, D] with an expanded index moved K and V at ~1.2 TB/s on an H100
(0.88 ms at 128K tokens, 8 KV heads, D=128); a row copy only has to read and write each row once.

With `pool_block` each program copies exactly one key block and also writes what selection
needs from it: the block's mean key (fp32) and the earliest original position it holds. That
saves selection a second read of the permuted K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(
    K, V, ORDER, KO, VO, KPOOL, MINPOS, KDELTA, KEND,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    N, H, NB,
    BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, POOL: tl.constexpr, PACKED: tl.constexpr = False,
    BLOCK_D: tl.constexpr = 0,
):
    # BLOCK_D: HEAD_DIM rounded up to a power of two (tl.arange); columns past HEAD_DIM are masked.
    i_r = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    m_r = o_r < N
    # [BLOCK_R] original position of each permuted slot
    b_src32 = tl.load(ORDER + i_bh.to(tl.int64) * N + o_r, mask=m_r, other=0)
    b_src = b_src32.to(tl.int64)
    if PACKED:
        # A packed batch's block lies in one sequence: virtual position -> packed row; the
        # padding slots after the sequence's last key get zero rows (finite: 0 * NaN = NaN).
        m_r = m_r & (b_src32 < tl.load(KEND + i_r))
        b_src = b_src + tl.load(KDELTA + i_r)
    # [BLOCK_R, BLOCK_D] (a copy: the column mask costs nothing worth a separate unmasked path)
    b_k = tl.load(K + i_b * stride_kb + i_h * stride_kh + b_src[:, None] * stride_kn + o_d[None, :],
                  mask=m_r[:, None] & m_d[None, :], other=0.0)
    b_v = tl.load(V + i_b * stride_vb + i_h * stride_vh + b_src[:, None] * stride_vn + o_d[None, :],
                  mask=m_r[:, None] & m_d[None, :], other=0.0)
    o_out = i_bh.to(tl.int64) * N * HEAD_DIM + o_r[:, None] * HEAD_DIM + o_d[None, :]
    m_out = (o_r < N)[:, None] & m_d[None, :]
    tl.store(KO + o_out, b_k, mask=m_out)
    tl.store(VO + o_out, b_v, mask=m_out)
    if POOL:
        # A partial last block averages its valid rows (padding rows loaded as 0).
        if PACKED:
            count = tl.maximum(tl.sum(m_r.to(tl.float32), 0), 1.0)
        else:
            count = tl.minimum(N - i_r * BLOCK_R, BLOCK_R).to(tl.float32)
        b_mean = tl.sum(b_k.to(tl.float32), 0) / count
        o_blk = i_bh.to(tl.int64) * NB + i_r
        tl.store(KPOOL + o_blk * HEAD_DIM + o_d, b_mean, mask=m_d)
        tl.store(MINPOS + o_blk, tl.min(tl.where(m_r, b_src32, 2147483647), 0))


def gather_keys_triton(k: torch.Tensor, v: torch.Tensor, order: torch.Tensor, block_rows: int = 64,
                       pool_block: int | None = None, packed=None):
    """Same contract as `gather_keys`: contiguous K and V in the slot order `order` [B, H, N]
    (int32, contiguous: the `pos` tensor the other ops take).

    With `pool_block=b` also returns the key-block statistics of `key_block_stats` (mean key per
    block [B, H, NB, D] float32, earliest original position per block [B, H, NB] int32).

    packed (a `pbs_kernels.packing.PackedLayout`, with pool_block = its block size): k and v are
    packed rows [1, H, total_k, D], `order` holds virtual positions [1, H, n_virtual], and the
    result is in virtual slots as `ops.permute.naive.gather_keys_packed` and
    `key_block_stats(..., valid)` give it."""
    B, H, N, D = k.shape
    if packed is not None:
        from ...packing import KDELTA, KEND

        N = order.shape[-1]
        kdelta, kend = packed.blk[KDELTA], packed.blk[KEND]
    else:
        kdelta = kend = order  # unused
    if order.dtype != torch.int32 or not order.is_contiguous():
        order = order.to(torch.int32).contiguous()
    k_out = torch.empty(B, H, N, D, device=k.device, dtype=k.dtype)
    v_out = torch.empty_like(k_out)
    rows = pool_block or block_rows
    nb = triton.cdiv(N, rows)
    if pool_block:
        k_pool = torch.empty(B, H, nb, D, device=k.device, dtype=torch.float32)
        min_pos = torch.empty(B, H, nb, device=k.device, dtype=torch.int32)
    else:
        k_pool = min_pos = k_out  # unused
    _gather_rows_kernel[(nb, B * H)](
        k, v, order, k_out, v_out, k_pool, min_pos, kdelta, kend,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        N, H, nb, BLOCK_R=rows, HEAD_DIM=D, POOL=bool(pool_block), PACKED=packed is not None,
        BLOCK_D=triton.next_power_of_2(D),
        # at head dim 256 a 128-row block is 64 KiB of K and of V: spread over 8 warps (unmeasured)
        num_warps=8 if D > 128 else 4,
    )
    if pool_block:
        return k_out, v_out, (k_pool, min_pos)
    return k_out, v_out
