"""Triton key scoring for the permutation: the attention each key gets from the last block of
queries, in two passes over K so nothing N x N is ever held.

Pass 1 writes per-(query row, key tile) softmax partials (max and sum in log2 units); torch
combines them into each row's log-sum-exp; pass 2 recomputes the scores, normalises them with
that log-sum-exp and sums the probabilities over the rows and the query heads of the group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import LOG2E, cdiv


@triton.jit
def _score_keys_kernel(
    Q, K, MPART, LPART, LSE, SCORE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    N, H, G, NT, qk_scale, inv_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    PASS: tl.constexpr, IEEE: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    m_n = o_n < N
    q_pos = N - BLOCK_M + o_m

    p_k = K + i_b * stride_kb + i_h * stride_kh + o_n[None, :] * stride_kn + o_d[:, None]
    # [HEAD_DIM, BLOCK_N]
    b_k = tl.load(p_k, mask=m_n[None, :], other=0.0)
    # [BLOCK_M, BLOCK_N]
    m_valid = (o_n[None, :] <= q_pos[:, None]) & m_n[None, :]

    b_score = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in range(G):
        i_hq = i_h * G + g
        p_q = Q + i_b * stride_qb + i_hq * stride_qh + q_pos[:, None] * stride_qn + o_d[None, :]
        # [BLOCK_M, HEAD_DIM]
        b_q = tl.load(p_q)
        if IEEE:
            b_s = tl.dot(b_q, b_k, input_precision="ieee")
        else:
            b_s = tl.dot(b_q, b_k)
        b_s = tl.where(m_valid, b_s * qk_scale, float("-inf"))
        o_row = (i_bh * G + g) * BLOCK_M + o_m
        if PASS == 1:
            # [BLOCK_M]
            b_max = tl.max(b_s, 1)
            b_safe = tl.where(b_max == float("-inf"), 0.0, b_max)
            b_sum = tl.sum(tl.exp2(b_s - b_safe[:, None]), 1)
            tl.store(MPART + o_row * NT + i_n, b_max)
            tl.store(LPART + o_row * NT + i_n, b_sum)
        else:
            b_lse = tl.load(LSE + o_row)
            b_score += tl.sum(tl.exp2(b_s - b_lse[:, None]), 0)
    if PASS == 2:
        tl.store(SCORE + i_bh * N + o_n, b_score * inv_rows, mask=m_n)


def score_keys_triton(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float,
                      block_n: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """Same contract as `score_keys_naive`; needs N >= block_size."""
    B, HQ, N, D = q.shape
    H = k.shape[1]
    G = HQ // H
    BLOCK_M = block_size
    BLOCK_N = block_n or (64 if D > 64 else 128)
    NT = cdiv(N, BLOCK_N)
    dev = q.device
    m_part = torch.empty(B * H * G * BLOCK_M * NT, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    score = torch.empty(B, H, N, device=dev, dtype=torch.float32)
    grid = (NT, B * H)
    args = dict(
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        N=N, H=H, G=G, NT=NT, qk_scale=scale * LOG2E, inv_rows=1.0 / (G * BLOCK_M),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=D, IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
    )
    _score_keys_kernel[grid](q, k, m_part, l_part, m_part, score, PASS=1, **args)
    m_part = m_part.view(-1, NT)
    l_part = l_part.view(-1, NT)
    m_row = m_part.amax(dim=1, keepdim=True)
    # log2-sum-exp2 per query row; every row sees at least key 0, so m_row is finite.
    lse = (m_row + torch.log2((l_part * torch.exp2(m_part - m_row)).sum(dim=1, keepdim=True))).view(-1)
    _score_keys_kernel[grid](q, k, m_part, l_part, lse.contiguous(), score, PASS=2, **args)
    return score
