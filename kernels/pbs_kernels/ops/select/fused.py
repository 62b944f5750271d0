"""Triton block selection: one program per (query block, batch x query head) turns a row of pooled
block scores into the compact list of kept key blocks.

The pooled scores themselves are one batched matmul in torch (tensor cores, [NQB, NKB] per head,
never N x N). The kernel then holds the row in registers and finds the top-p cut by bisection on
the probability value instead of sorting: the kept set {p >= t} with the largest t whose mass still
reaches the threshold is exactly the smallest set reaching it (up to exact ties). Compaction uses a
prefix sum, so the list comes out in ascending block order with no sort at all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import cdiv, interpreting
from .naive import BlockList, pool_blocks

MAX_ROW = 8192  # key blocks held in registers per program (1M tokens at b=128)


def _configs():
    # Each program reduces one row of <= 8192 values 40 times; fewer warps keep those reductions
    # inside a warp. Which count wins depends on the row length and the GPU, so the first call per
    # row length picks it (the interpreter allows a single config).
    warps = (4,) if interpreting() else (1, 2, 4, 8)
    return [triton.Config({}, num_warps=w) for w in warps]


@triton.autotune(configs=_configs(), key=["BLOCK_K"])
@triton.jit
def _select_kernel(
    S, SINK, MINPOS, IDX, NOFF, NTOT,
    NB, HQ, G, SPB, N, BS, threshold,
    BLOCK_K: tl.constexpr, SEG_P2: tl.constexpr, KEEP_ALL: tl.constexpr, ITERS: tl.constexpr,
):
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_h = (i_bh // HQ) * (HQ // G) + (i_bh % HQ) // G  # flat (batch, kv head)
    row = i_bh.to(tl.int64) * NB + i_q

    seg_start = (i_q // SPB) * SPB  # first block of the query's own segment
    o_k = tl.arange(0, BLOCK_K)
    m_earlier = o_k < seg_start
    # [BLOCK_K]
    b_s = tl.load(S + row * NB + o_k, mask=m_earlier, other=float("-inf"))
    b_max = tl.max(b_s, 0)
    b_p = tl.where(m_earlier, tl.exp(b_s - tl.where(b_max == float("-inf"), 0.0, b_max)), 0.0)
    b_p = b_p / tl.maximum(tl.sum(b_p, 0), 1e-30)

    if KEEP_ALL:
        m_keep = m_earlier
    else:
        lo = tl.zeros([], dtype=tl.float32)
        hi = tl.max(b_p, 0) * 1.0000001 + 1e-30
        for _ in range(ITERS):
            mid = (lo + hi) * 0.5
            mass = tl.sum(tl.where(b_p >= mid, b_p, 0.0), 0)
            ok = mass >= threshold
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        m_keep = (b_p >= lo) & (b_p > 0.0) & m_earlier
    sink = tl.load(SINK + i_h)
    m_keep = m_keep | ((o_k == sink) & m_earlier)

    p_idx = IDX + row * NB
    keep_i = m_keep.to(tl.int32)
    slot = tl.cumsum(keep_i, 0) - 1
    tl.store(p_idx + slot, o_k, mask=m_keep)
    n_off = tl.sum(keep_i, 0)

    # Own segment: blocks holding a key at or before the query block's last position.
    o_j = seg_start + tl.arange(0, SEG_P2)
    last_q = tl.minimum((i_q + 1) * BS - 1, N - 1)
    m_seg = (o_j < seg_start + SPB) & (o_j < NB)
    b_min = tl.load(MINPOS + i_h.to(tl.int64) * NB + o_j, mask=m_seg, other=2147483647)
    m_diag = m_seg & (b_min <= last_q)
    diag_i = m_diag.to(tl.int32)
    tl.store(p_idx + n_off + tl.cumsum(diag_i, 0) - 1, o_j, mask=m_diag)
    tl.store(NOFF + row, n_off)
    tl.store(NTOT + row, n_off + tl.sum(diag_i, 0))


def select_blocks_triton(q, k_perm, pos, *, block_size: int, segment_size: int, threshold: float,
                         scale: float) -> BlockList | None:
    """Same contract as `select_blocks_naive`; None when a row would not fit in registers."""
    B, HQ, N, D = q.shape
    H = k_perm.shape[1]
    G = HQ // H
    nb = cdiv(N, block_size)
    BLOCK_K = triton.next_power_of_2(nb)
    if BLOCK_K > MAX_ROW:
        return None
    spb = segment_size // block_size
    q_pool = pool_blocks(q, block_size).reshape(B, H, G * nb, D)
    k_pool = pool_blocks(k_perm, block_size)
    # [B, HQ, NQB, NKB] pooled scores in fp32 (exact, not tf32: the cut is sensitive to them).
    s = (torch.matmul(q_pool, k_pool.transpose(-1, -2)) * scale).reshape(B, HQ, nb, nb)
    pad = nb * block_size - N
    pos_blk = torch.nn.functional.pad(pos, (0, pad), value=N).reshape(B, H, nb, block_size)
    min_pos = pos_blk.amin(-1).to(torch.int32).contiguous()
    sink = torch.argmin(pos_blk.amin(-1), dim=-1).to(torch.int32).contiguous()  # block holding token 0
    idx = torch.empty(B, HQ, nb, nb, device=q.device, dtype=torch.int32)
    n_off = torch.empty(B, HQ, nb, device=q.device, dtype=torch.int32)
    n_tot = torch.empty_like(n_off)
    _select_kernel[(nb, B * HQ)](
        s, sink, min_pos, idx, n_off, n_tot,
        nb, HQ, G, spb, N, block_size, float(threshold),
        BLOCK_K=BLOCK_K, SEG_P2=triton.next_power_of_2(spb), KEEP_ALL=threshold >= 1.0, ITERS=40,
    )
    return BlockList(idx=idx, n_off=n_off, n_total=n_tot, block_size=block_size)
