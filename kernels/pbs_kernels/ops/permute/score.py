"""Triton key scoring for the permutation: the attention each key gets from the last block of
queries, in two passes over K so nothing N x N is ever held.

Both passes are FlashAttention-shaped: a program keeps one query head's last BLOCK_M query rows
resident and walks a contiguous chunk of key tiles, so Q is read once per chunk instead of once
per key tile (the first version re-read the whole query block for every 64 keys and ran at a
third of tensor-core speed).

Pass 1 runs an online softmax over its chunk and writes one (max, sum) pair per query row and
chunk, in log2 units; torch combines the chunks into each row's log-sum-exp. Pass 2 computes
the scores transposed, keys x queries, so that summing probabilities over the query rows is a
reduction along each register row rather than across warps. It writes one score per (query
head, key); the group's heads are summed afterwards in a fixed order (deterministic, unlike
atomics): by torch in `score_keys_triton`, inside the segment sort on the permutation path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import LOG2E, cdiv

# Programs to aim for: a few waves on a 132-SM H100 without making chunks so short that each
# program spends its time loading Q.
_TARGET_PROGRAMS = 1024


@triton.jit
def _lse_pass(
    Q, K, MPART, LPART,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    N, HQ, G, NC, TILES_PER_CHUNK, qk_scale, QOFF,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_bhq = tl.program_id(1)
    i_b = (i_bhq // HQ).to(tl.int64)
    i_hq = (i_bhq % HQ).to(tl.int64)
    i_h = i_hq // G

    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    q_pos = N - BLOCK_M + o_m
    # [BLOCK_M, HEAD_DIM], resident for the whole chunk
    # (Q's rows are the last N - QOFF of the N positions: a chunk against its cached prefix)
    b_q = tl.load(Q + i_b * stride_qb + i_hq * stride_qh + (q_pos - QOFF)[:, None] * stride_qn + o_d[None, :])
    p_k0 = K + i_b * stride_kb + i_h * stride_kh + o_d[:, None]

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    t0 = i_c * TILES_PER_CHUNK
    t1 = tl.minimum(t0 + TILES_PER_CHUNK, tl.cdiv(N, BLOCK_N))
    for t in range(t0, t1):
        o_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        # [HEAD_DIM, BLOCK_N]
        b_kt = tl.load(p_k0 + o_n[None, :] * stride_kn, mask=o_n[None, :] < N, other=0.0)
        if IEEE:
            b_s = tl.dot(b_q, b_kt, input_precision="ieee")
        else:
            b_s = tl.dot(b_q, b_kt)
        b_s = b_s * qk_scale
        if t * BLOCK_N + BLOCK_N > N - BLOCK_M:  # only the last tiles meet the causal edge
            b_s = tl.where(o_n[None, :] <= q_pos[:, None], b_s, float("-inf"))
        b_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_safe = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_l = b_l * tl.exp2(b_m - b_safe) + tl.sum(tl.exp2(b_s - b_safe[:, None]), 1)
        b_m = b_new
    o_row = (i_bhq * BLOCK_M + o_m).to(tl.int64) * NC + i_c
    tl.store(MPART + o_row, b_m)
    tl.store(LPART + o_row, b_l)


@triton.jit
def _sum_pass(
    Q, K, LSE, SCORE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    N, HQ, G, TILES_PER_CHUNK, qk_scale, QOFF,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_bhq = tl.program_id(1)
    i_b = (i_bhq // HQ).to(tl.int64)
    i_hq = (i_bhq % HQ).to(tl.int64)
    i_h = i_hq // G

    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    q_pos = N - BLOCK_M + o_m
    # [HEAD_DIM, BLOCK_M]: Q transposed, so the product is keys x queries
    b_qt = tl.load(Q + i_b * stride_qb + i_hq * stride_qh + (q_pos - QOFF)[None, :] * stride_qn + o_d[:, None])
    b_lse = tl.load(LSE + i_bhq.to(tl.int64) * BLOCK_M + o_m)
    p_k0 = K + i_b * stride_kb + i_h * stride_kh + o_d[None, :]
    p_out = SCORE + i_bhq.to(tl.int64) * N

    t0 = i_c * TILES_PER_CHUNK
    t1 = tl.minimum(t0 + TILES_PER_CHUNK, tl.cdiv(N, BLOCK_N))
    for t in range(t0, t1):
        o_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        # [BLOCK_N, HEAD_DIM]
        b_k = tl.load(p_k0 + o_n[:, None] * stride_kn, mask=m_n[:, None], other=0.0)
        if IEEE:
            b_st = tl.dot(b_k, b_qt, input_precision="ieee")
        else:
            b_st = tl.dot(b_k, b_qt)
        b_st = b_st * qk_scale
        if t * BLOCK_N + BLOCK_N > N - BLOCK_M:
            b_st = tl.where(o_n[:, None] <= q_pos[None, :], b_st, float("-inf"))
        # [BLOCK_N]: probability mass each key gets from this head's query rows
        b_p = tl.sum(tl.exp2(b_st - b_lse[None, :]), 1)
        tl.store(p_out + o_n, b_p, mask=m_n)


def _chunking(n_tiles: int, rows: int) -> tuple[int, int]:
    """(tiles per chunk, chunks) so that rows x chunks is near _TARGET_PROGRAMS."""
    want_chunks = max(1, _TARGET_PROGRAMS // max(rows, 1))
    per = max(1, cdiv(n_tiles, want_chunks))
    return per, cdiv(n_tiles, per)


def score_keys_per_head(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float,
                        block_n: int = 64, num_warps: int = 4, num_stages: int | None = None,
                        tiles_per_chunk: int | None = None) -> torch.Tensor:
    """Sum over the last `block_size` query rows of each query head's softmax, per key (q may
    hold the last M >= block_size of k's N positions):
    [B * HQ, N] float32 (heads of one KV group adjacent). `score_keys_triton` is its group mean.
    The keyword knobs after `scale` are for kernel tuning (scripts/gpu_permute_dev.py)."""
    B, HQ, M, D = q.shape
    H, N = k.shape[1], k.shape[2]
    BLOCK_M = block_size
    if num_stages is None:
        # Measured on an H200 at 128K (Triton 3.6): 3 stages 0.68 ms, 2 stages 0.77 ms.
        num_stages = 3 if q.is_cuda else 1
    n_tiles = cdiv(N, block_n)
    per, NC = _chunking(n_tiles, B * HQ)
    if tiles_per_chunk:
        per, NC = tiles_per_chunk, cdiv(n_tiles, tiles_per_chunk)
    dev = q.device
    m_part = torch.empty(B * HQ * BLOCK_M * NC, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    common = dict(
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        N=N, HQ=HQ, G=HQ // H, TILES_PER_CHUNK=per, qk_scale=scale * LOG2E, QOFF=N - M,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, HEAD_DIM=D, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    grid = (NC, B * HQ)
    _lse_pass[grid](q, k, m_part, l_part, NC=NC, **common)
    m_part = m_part.view(-1, NC)
    l_part = l_part.view(-1, NC)
    m_row = m_part.amax(dim=1, keepdim=True)
    # log2-sum-exp2 per query row; every row sees at least key 0, so m_row is finite (chunks
    # past a row's causal edge hold -inf and weigh 0).
    lse = (m_row + torch.log2((l_part * torch.exp2(m_part - m_row)).sum(dim=1, keepdim=True))).view(-1)
    per_head = torch.empty(B * HQ, N, device=dev, dtype=torch.float32)
    _sum_pass[grid](q, k, lse.contiguous(), per_head, **common)
    return per_head


def score_keys_triton(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float,
                      **knobs) -> torch.Tensor:
    """Same contract as `score_keys_naive`; needs M >= block_size."""
    B, HQ, _, _ = q.shape
    H, N = k.shape[1], k.shape[2]
    G = HQ // H
    per_head = score_keys_per_head(q, k, block_size=block_size, scale=scale, **knobs)
    return per_head.view(B, H, G, N).sum(dim=2) * (1.0 / (G * block_size))
