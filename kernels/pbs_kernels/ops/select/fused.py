"""Triton block selection: one program per (query block, batch x query head) turns a row of pooled
block scores into the compact list of kept key blocks.

The pooled scores themselves are one batched TF32 matmul in torch ([NQB, NKB] per head, never
N x N). The kernel then holds the row in registers and finds the top-p cut by bisection on
the probability's bits instead of sorting: the kept set {p >= t} with the largest t whose mass still
reaches the threshold is exactly the smallest set reaching it (up to exact ties). Compaction uses a
prefix sum, so the list comes out in ascending block order with no sort at all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _host
from .._common import MAX_ROW, cdiv, default_scale, interpreting
from ...blocks import BlockList, block_representatives, key_block_max_pos, key_block_stats, pool_query_blocks
from ...settings import PbsSettings
from .naive import HEAD_BINS, HEAD_BINS_PER_OCTAVE, head_cut


def _configs():
    # Each program reduces one row of <= 8192 values 31 times; fewer warps keep those reductions
    # inside a warp. Which count wins depends on the row length and the GPU, so the first call per
    # row length picks it (the interpreter allows a single config).
    warps = (4,) if interpreting() else (1, 2, 4, 8)
    return [triton.Config({}, num_warps=w) for w in warps]


@triton.jit
def _block_logits(S, LOGW, row, i_h, o_k, m_k, NB, scale, NREP: tl.constexpr):
    # [len(o_k)] estimated log-mass of key blocks o_k: the log-sum-exp over the NREP
    # representatives' scaled pooled products plus their log weights (NREP = 1: the product).
    if NREP == 1:
        b_s = tl.load(S + row * NB + o_k, mask=m_k, other=float("-inf")) * scale
    else:
        b_s = tl.full(o_k.shape, float("-inf"), dtype=tl.float32)
        for r in tl.static_range(NREP):
            b_x = tl.load(S + (row * NREP + r) * NB + o_k, mask=m_k, other=0.0) * scale
            b_x += tl.load(LOGW + (i_h.to(tl.int64) * NREP + r) * NB + o_k, mask=m_k, other=float("-inf"))
            b_m = tl.maximum(b_s, b_x)
            # the larger term is exp(0) = 1 wherever b_m is finite, so the clamp only avoids log(0)
            b_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
            b_s = tl.where(b_m == float("-inf"), float("-inf"),
                           b_safe + tl.log(tl.maximum(tl.exp(b_s - b_safe) + tl.exp(b_x - b_safe), 1.0)))
    return b_s


# RULE: how a row's earlier tiles are cut. 0: its own top-p (bisection); 1 (HEAD_HIST): write the
# row's mass per grid bin of the "head" rule and nothing else; 2 (HEAD_CUT): keep the bins up to
# the head's cut (from the summed histograms). Literals in the kernel: Triton reads no plain globals.
ROW_CUT, HEAD_HIST, HEAD_CUT = 0, 1, 2


@triton.autotune(configs=_configs(), key=["BLOCK_K", "NREP", "TOTAL", "PACKED", "RULE"])
@triton.jit
def _select_kernel(
    S, LOGW, SINK, MINPOS, MAXPOS, IDX, NOFF, NTOT, BLK, HIST, CUT,
    NB, HQ, G, SPB, N, BS, threshold, scale, Q0, NQB, QOFF, W,
    BLOCK_K: tl.constexpr, SEG_P2: tl.constexpr, KEEP_ALL: tl.constexpr, ITERS: tl.constexpr,
    NREP: tl.constexpr, TOTAL: tl.constexpr, WINDOW: tl.constexpr, PACKED: tl.constexpr = False,
    RULE: tl.constexpr = 0, NBINS: tl.constexpr = 96, BINS_PER_OCTAVE: tl.constexpr = 4,
):
    # i_q: the query block's index among the key blocks; rows of S and IDX start at QOFF's block
    # (queries that are the last M of N positions; 0 for prefill).
    i_bh = tl.program_id(1)
    i_h = (i_bh // HQ) * (HQ // G) + (i_bh % HQ) // G  # flat (batch, kv head)
    if PACKED:
        # A packed batch (`pbs_kernels.packing`): BLK holds the layout's per-block rows, then the
        # query blocks of this width class from Q0 on. A row only considers the key blocks of
        # its own sequence (from kb0) and its sink is that sequence's first key's block.
        i_q = tl.load(BLK + 8 * NB + Q0 + tl.program_id(0))
        kb0 = tl.load(BLK + i_q)
        first_q = tl.load(BLK + 3 * NB + i_q)
        last_q = tl.load(BLK + 4 * NB + i_q)
        dense = tl.load(BLK + 6 * NB + i_q)
        row = i_bh.to(tl.int64) * NQB + i_q
        o_k = kb0 + tl.arange(0, BLOCK_K)
    else:
        i_q = Q0 + tl.program_id(0)
        row = i_bh.to(tl.int64) * NQB + (i_q - QOFF // BS)
        o_k = tl.arange(0, BLOCK_K)
        first_q = tl.maximum(i_q * BS, QOFF)
        last_q = tl.minimum((i_q + 1) * BS - 1, N - 1)

    seg_start = (i_q // SPB) * SPB  # first block of the query's own segment
    m_earlier = o_k < seg_start
    if WINDOW:
        # Blocks wholly before every query's window are not candidates at all; those that
        # straddle its edge are kept in the masked part of the list.
        b_maxk = tl.load(MAXPOS + i_h.to(tl.int64) * NB + o_k, mask=m_earlier, other=-1)
        b_mink = tl.load(MINPOS + i_h.to(tl.int64) * NB + o_k, mask=m_earlier, other=2147483647)
        m_earlier = m_earlier & (b_maxk > first_q - W)
    # Own segment: blocks holding a key at or before the query block's last position.
    o_j = seg_start + tl.arange(0, SEG_P2)
    m_seg = (o_j < seg_start + SPB) & (o_j < NB)
    b_min = tl.load(MINPOS + i_h.to(tl.int64) * NB + o_j, mask=m_seg, other=2147483647)
    m_diag = m_seg & (b_min <= last_q)
    if WINDOW:
        b_maxj = tl.load(MAXPOS + i_h.to(tl.int64) * NB + o_j, mask=m_seg, other=-1)
        m_diag = m_diag & (b_maxj > first_q - W)

    # [BLOCK_K]
    # Only the first BLOCK_K >= seg_start entries of the row can be kept; the softmax scale is
    # applied here rather than in a separate pass over the [NQB, NKB] logits.
    b_s = _block_logits(S, LOGW, row, i_h, o_k, m_earlier, NB, scale, NREP)
    b_max = tl.max(b_s, 0)
    b_p = tl.where(m_earlier, tl.exp(b_s - tl.where(b_max == float("-inf"), 0.0, b_max)), 0.0)
    b_sum = tl.sum(b_p, 0)
    b_p = b_p / tl.maximum(b_sum, 1e-30)

    thr = threshold
    if TOTAL:
        # [SEG_P2] the own segment's estimated mass, on the earlier blocks' scale
        b_own = _block_logits(S, LOGW, row, i_h, o_j, m_diag, NB, scale, NREP)
        b_top = tl.maximum(b_max, tl.max(b_own, 0))
        b_top = tl.where(b_top == float("-inf"), 0.0, b_top)
        e_own = tl.sum(tl.where(m_diag, tl.exp(b_own - b_top), 0.0), 0)
        e_all = e_own + tl.sum(tl.where(m_earlier, tl.exp(b_s - b_top), 0.0), 0)
        p_own = e_own / tl.maximum(e_all, 1e-30)
        # <= 0: the own segment alone reaches the threshold, so no earlier block is needed
        thr = (threshold - p_own) / tl.maximum(1.0 - p_own, 1e-30)

    if RULE != 0:
        # The "head" rule's grid bin of each share (naive.head_bins: floor(-log2(p) * 4), clamped);
        # truncation is the floor here because the value is clamped to >= 0 first.
        b_x = -tl.log2(tl.maximum(b_p, 1e-38)) * BINS_PER_OCTAVE
        b_bin = tl.minimum(tl.maximum(b_x, 0.0), NBINS - 1.0).to(tl.int32)
    if RULE == 1:
        # One reduction per bin the row occupies (HIST is zeroed). This pass is what the head rule
        # costs: pbs.select 1.5-2.2 ms at 128K against 0.9-1.1 for the row rule (H200, BENCHMARKS §13).
        m_pos = m_earlier & (b_p > 0.0)
        j_lo = tl.min(tl.where(m_pos, b_bin, NBINS), 0)
        j_hi = tl.max(tl.where(m_pos, b_bin, -1), 0)
        for j in range(j_lo, j_hi + 1):
            tl.store(HIST + row * NBINS + j, tl.sum(tl.where(m_pos & (b_bin == j), b_p, 0.0), 0))
    elif RULE == 2:
        cut = tl.load(CUT + i_bh)
        m_keep = (b_bin <= cut) & (b_p > 0.0) & m_earlier
    elif KEEP_ALL:
        m_keep = m_earlier
    else:
        # Bisection on the bit patterns: a non-negative float's bits order like its value, so
        # the cut is found exactly (an integer) in 31 steps, whatever the spread of the p's.
        # Invariant: the entries with bits >= lo carry mass >= thr, those >= hi less.
        b_bits = b_p.to(tl.int32, bitcast=True)
        lo = tl.zeros([], dtype=tl.int32)
        hi = tl.max(b_bits, 0) + 1
        for _ in range(ITERS):
            mid = lo + (hi - lo) // 2
            mass = tl.sum(tl.where(b_bits >= mid, b_p, 0.0), 0)
            ok = mass >= thr
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        m_keep = (b_bits >= lo) & (b_p > 0.0) & m_earlier
        if TOTAL:
            m_keep = m_keep & ((b_p * 0.0 + thr) > 0.0)  # thr broadcast to the row
    if RULE != 1:  # the histogram pass writes no list
        # A dense sequence's rows and the final rows (naive.final_rows: those holding one of the
        # sequence's last BS query positions) keep every causal tile.
        if PACKED:
            full = (dense != 0) | (last_q >= tl.load(BLK + 2 * NB + i_q) - BS)
            sink = tl.load(SINK + i_h.to(tl.int64) * NB + i_q)
        else:
            full = last_q >= N - BS
            sink = tl.load(SINK + i_h)
        m_keep = m_keep | (m_earlier & ((o_k * 0 + full.to(tl.int32)) != 0))
        m_keep = m_keep | ((o_k == sink) & m_earlier)

        p_idx = IDX + row * NB
        if WINDOW:
            m_mid = m_keep & (b_mink <= last_q - W)
            m_keep = m_keep & ~m_mid
        keep_i = m_keep.to(tl.int32)
        slot = tl.cumsum(keep_i, 0) - 1
        tl.store(p_idx + slot, o_k, mask=m_keep)
        n_off = tl.sum(keep_i, 0)
        n_mid = n_off
        if WINDOW:
            mid_i = m_mid.to(tl.int32)
            tl.store(p_idx + n_off + tl.cumsum(mid_i, 0) - 1, o_k, mask=m_mid)
            n_mid = n_off + tl.sum(mid_i, 0)

        diag_i = m_diag.to(tl.int32)
        tl.store(p_idx + n_mid + tl.cumsum(diag_i, 0) - 1, o_j, mask=m_diag)
        tl.store(NOFF + row, n_off)
        tl.store(NTOT + row, n_mid + tl.sum(diag_i, 0))


def _row_widths(nb: int, spb: int) -> list[int]:
    """Powers of two from 64 (at least one segment) up to the full row, for `select_blocks_triton`."""
    top = triton.next_power_of_2(nb)
    widths = [max(64, triton.next_power_of_2(spb))]
    while widths[-1] < top:
        widths.append(widths[-1] * 2)
    return widths


def pooled_scores(q_pool: torch.Tensor, k_pool: torch.Tensor) -> torch.Tensor:
    """[B, H, G*NQB, D] x [B, H, NKB, D] -> pooled block products (unscaled), one batched matmul.

    TF32 on the GPU: at 128K tokens the GEMM takes 0.06 ms instead of 0.22 in fp32, and the whole
    selection 0.81 ms instead of 0.97 (H100); on the synthetic workload 99.2% of rows keep the
    same number of blocks as in fp32, with density and output error equal to 4 digits
    (scripts/gpu_permute_variants.py). The torch reference stays fp32.
    """
    if not q_pool.is_cuda:
        return torch.matmul(q_pool, k_pool.transpose(-1, -2))
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return torch.matmul(q_pool, k_pool.transpose(-1, -2))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def select_blocks_triton(q, k_perm, pos, settings: PbsSettings, *, key_stats=None) -> BlockList | None:
    """Same contract as `select_blocks_naive`; None when a row would not fit in registers.
    key_stats: `key_block_stats(k_perm, pos, block_size)` if the caller already has it."""
    block_size, segment_size, window = settings.block_size, settings.segment_size, settings.window
    threshold, estimator, threshold_mass = settings.threshold, settings.estimator, settings.threshold_mass
    if threshold_mass not in ("earlier", "total", "head"):
        raise ValueError(f"select_blocks: unknown threshold_mass {threshold_mass!r}")
    B, HQ, M, D = q.shape
    scale = default_scale(D) if settings.scale is None else settings.scale
    H, N = k_perm.shape[1], k_perm.shape[2]
    G = HQ // H
    nb = cdiv(N, block_size)
    q_off = N - M
    qb0 = q_off // block_size
    nqb = nb - qb0
    BLOCK_K = triton.next_power_of_2(nb)
    if BLOCK_K > MAX_ROW:
        return None
    spb = segment_size // block_size
    k_pool, min_pos = key_stats if key_stats is not None else key_block_stats(k_perm, pos, block_size)
    # torch's reduction reads Q at ~2.9 TB/s on an H100 (0.37 ms at 128K); a one-load-per-block
    # Triton kernel measured 0.46 ms, and pooling inside the score kernel slowed it by 0.5 ms.
    q_pool = pool_query_blocks(q, block_size, q_off).reshape(B, H, G * nqb, D)
    reps, logw = block_representatives(k_perm, k_pool, block_size, estimator)
    nrep = reps.shape[2]
    # [B, HQ, NQB, NREP, NKB] pooled products with each representative; the kernel scales and
    # combines them
    s = pooled_scores(q_pool, reps.reshape(B, H, nrep * nb, D)).reshape(B, HQ, nqb, nrep, nb)
    logw = s if logw is None else logw  # unused when NREP == 1
    sink = torch.argmin(min_pos, dim=-1)  # the block holding token 0 (int64: the kernel loads either)
    if _host.LEGACY_HOST:
        sink = sink.to(torch.int32).contiguous()
    max_pos = key_block_max_pos(pos, block_size) if window is not None else min_pos
    idx = torch.empty(B, HQ, nqb, nb, device=q.device, dtype=torch.int32)
    n_off = torch.empty(B, HQ, nqb, device=q.device, dtype=torch.int32)
    n_tot = torch.empty_like(n_off)

    def launch(rule, hist, cut):
        # Query blocks in ranges by how many earlier blocks they can keep, each range with a row
        # width of the next power of two: early rows do less work than the last ones (a third
        # less work in all than one width for every row).
        q0 = qb0
        for width in _row_widths(nb, spb):
            q1 = min(nb, (width // spb + 1) * spb)  # the query blocks whose earlier blocks fit `width`
            if q0 >= nb:
                break
            if q1 <= q0:
                continue  # a chunk's query blocks all need a wider row
            _select_kernel[(q1 - q0, B * HQ)](
                s, logw, sink, min_pos, max_pos, idx, n_off, n_tot, sink, hist, cut,
                nb, HQ, G, spb, N, block_size, float(threshold), float(scale), q0, nqb, q_off, int(window or 0),
                BLOCK_K=width, SEG_P2=triton.next_power_of_2(spb), KEEP_ALL=threshold >= 1.0, ITERS=31,
                NREP=nrep, TOTAL=threshold_mass == "total", WINDOW=window is not None, PACKED=False,
                RULE=rule, NBINS=HEAD_BINS, BINS_PER_OCTAVE=HEAD_BINS_PER_OCTAVE,
            )
            q0 = q1

    if threshold_mass == "head" and threshold < 1.0:
        # Two launches and no host sync: each row's mass per grid bin, then the rows' lists under
        # their head's cut (the bins summed over the head's rows; naive.head_keep is the rule).
        hist = torch.zeros(B * HQ * nqb, HEAD_BINS, device=q.device, dtype=torch.float32)
        launch(HEAD_HIST, hist, n_off)
        cut = head_cut(hist.view(B, HQ, nqb, HEAD_BINS).sum(2), threshold).contiguous()
        launch(HEAD_CUT, hist, cut)
    else:
        launch(ROW_CUT, n_off, n_off)  # HIST and CUT unused
    return BlockList(idx=idx, n_off=n_off, n_total=n_tot, block_size=block_size, q_block0=qb0)


@triton.jit
def _pool_packed_kernel(Q, QPOOL, BLK, stride_qh, stride_qn, NB, HQ,
                        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (query block holding a query, query head): the fp32 mean of its queries,
    # read from the packed rows.
    i_q = tl.load(BLK + 8 * NB + tl.program_id(0))
    i_hq = tl.program_id(1).to(tl.int64)
    first_q = tl.load(BLK + 3 * NB + i_q)
    last_q = tl.load(BLK + 4 * NB + i_q)
    q_delta = tl.load(BLK + 5 * NB + i_q)
    o_m = i_q * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    m_m = (o_m >= first_q) & (o_m <= last_q)
    o_d = tl.arange(0, BLOCK_D)  # HEAD_DIM rounded up to a power of two; the rest masked
    m_d = o_d < HEAD_DIM
    # [BLOCK_SIZE, BLOCK_D]
    b_q = tl.load(Q + i_hq * stride_qh + (o_m + q_delta).to(tl.int64)[:, None] * stride_qn + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0)
    b_mean = tl.sum(b_q.to(tl.float32), 0) / (last_q - first_q + 1).to(tl.float32)
    tl.store(QPOOL + (i_hq * NB + i_q) * HEAD_DIM + o_d, b_mean, mask=m_d)


def select_blocks_packed_triton(q, k_perm, pos, layout, settings: PbsSettings, *, key_stats=None) -> BlockList:
    """Packed batches: the contract of `select_blocks_naive(..., packed=layout)` (q [1, HQ,
    total_q, D] packed rows; k_perm / pos in virtual slots), one row per virtual block. The
    pooled scores cover the whole virtual sequence (one GEMM); each query block's row starts at
    its sequence's first block, so the row-width classes go by the block's index inside its
    sequence."""
    from ...packing import block_counts, packed_sinks, slot_valid

    threshold, estimator, threshold_mass, window = (settings.threshold, settings.estimator, settings.threshold_mass,
                                                    settings.window)
    if threshold_mass not in ("earlier", "total"):
        raise ValueError(f"select_blocks: threshold_mass {threshold_mass!r} is not one of the packed rules "
                         "(earlier, total); 'head' cuts per sequence, so pbs_attention_varlen runs it one "
                         "sequence at a time")
    _, HQ, _, D = q.shape
    scale = default_scale(D) if settings.scale is None else settings.scale
    H, N = k_perm.shape[1], k_perm.shape[2]
    G = HQ // H
    b = layout.block_size
    nb = layout.num_blocks
    spb = layout.segment_size // b
    if key_stats is None:
        key_stats = key_block_stats(k_perm, pos, b, slot_valid(pos, layout))
    k_pool, min_pos = key_stats
    tables = layout.tables  # its 8 per-block rows, then the query blocks to pool and select
    n_q = layout.qlist.numel()
    q_pool = torch.zeros(HQ, nb, D, device=q.device, dtype=torch.float32)
    if n_q:
        _pool_packed_kernel[(n_q, HQ)](q, q_pool, tables, q.stride(1), q.stride(2), nb, HQ,
                                       BLOCK_SIZE=b, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
                                       num_warps=8 if D > 128 else 4)
    count = block_counts(layout) if estimator == "top" else None
    reps, logw = block_representatives(k_perm, k_pool, b, estimator, count)
    nrep = reps.shape[2]
    s = pooled_scores(q_pool.view(1, H, G * nb, D), reps.reshape(1, H, nrep * nb, D)).reshape(1, HQ, nb, nrep, nb)
    logw = s if logw is None else logw  # unused when NREP == 1
    sink = packed_sinks(min_pos, layout)
    max_pos = key_block_max_pos(pos, b) if window is not None else min_pos
    idx = torch.empty(1, HQ, nb, nb, device=q.device, dtype=torch.int32)
    n_off = torch.zeros(1, HQ, nb, device=q.device, dtype=torch.int32)  # blocks with no query keep nothing
    n_tot = torch.zeros_like(n_off)
    for width, start, count in layout.classes:
        _select_kernel[(count, HQ)](
            s, logw, sink, min_pos, max_pos, idx, n_off, n_tot, tables, n_off, n_off,  # no HIST, CUT
            nb, HQ, G, spb, N, b, float(threshold), float(scale), start, nb, 0, int(window or 0),
            BLOCK_K=width, SEG_P2=triton.next_power_of_2(spb), KEEP_ALL=threshold >= 1.0, ITERS=31,
            NREP=nrep, TOTAL=threshold_mass == "total", WINDOW=window is not None, PACKED=True,
        )
    return BlockList(idx=idx, n_off=n_off, n_total=n_tot, block_size=b, q_block0=0)
