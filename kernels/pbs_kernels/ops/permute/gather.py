"""Triton row gather: K and V in permuted order in one pass (each slot copies one D-wide row).

torch.gather on [B, H, N, D] with an expanded index moved K and V at ~1.2 TB/s on an H100
(0.88 ms at 128K tokens, 8 KV heads, D=128); a row copy only has to read and write each row once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(
    K, V, ORDER, KO, VO,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    N, H,
    BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    i_r = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, HEAD_DIM)
    m_r = o_r < N
    # [BLOCK_R] original position of each permuted slot
    b_src = tl.load(ORDER + i_bh.to(tl.int64) * N + o_r, mask=m_r, other=0).to(tl.int64)
    # [BLOCK_R, HEAD_DIM]
    b_k = tl.load(K + i_b * stride_kb + i_h * stride_kh + b_src[:, None] * stride_kn + o_d[None, :],
                  mask=m_r[:, None])
    b_v = tl.load(V + i_b * stride_vb + i_h * stride_vh + b_src[:, None] * stride_vn + o_d[None, :],
                  mask=m_r[:, None])
    o_out = i_bh.to(tl.int64) * N * HEAD_DIM + o_r[:, None] * HEAD_DIM + o_d[None, :]
    tl.store(KO + o_out, b_k, mask=m_r[:, None])
    tl.store(VO + o_out, b_v, mask=m_r[:, None])


def gather_keys_triton(k: torch.Tensor, v: torch.Tensor, order: torch.Tensor, block_rows: int = 64):
    """Same contract as `gather_keys`: contiguous K and V in the slot order `order` [B, H, N]
    (int32, contiguous: the `pos` tensor the other ops take)."""
    B, H, N, D = k.shape
    if order.dtype != torch.int32 or not order.is_contiguous():
        order = order.to(torch.int32).contiguous()
    k_out = torch.empty(B, H, N, D, device=k.device, dtype=k.dtype)
    v_out = torch.empty_like(k_out)
    grid = (triton.cdiv(N, block_rows), B * H)
    _gather_rows_kernel[grid](
        k, v, order, k_out, v_out,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        N, H, BLOCK_R=block_rows, HEAD_DIM=D, num_warps=4,
    )
    return k_out, v_out
