"""Triton forward of permuted block-sparse attention over a compact list of kept tiles.

One program per (query block, batch x query head). It walks the query block's kept key blocks:
first the blocks of earlier segments with no mask at all (every key there is in the past), then
the blocks of its own segment, masked token by token with the keys' original positions. K/V are
read from the query head's KV head directly (grouped-query attention with no copy).

Serving shapes are optional behaviour of the same kernel (constexpr flags, off for plain
prefill): queries that are the last M of N positions (QOFF = N - M, the program's query block is
counted among the key blocks from QOFF // BLOCK_SIZE), a sliding window (WINDOW: the masked loop
also drops keys at or before q_pos - W; selection puts window-straddling tiles in that loop and
never keeps tiles wholly outside), learned sinks (HAS_SINK: one logit per head added to the
softmax denominator), logit soft-capping (SOFTCAP: tanh on each score tile) and vertical keys
(TOPK > 0: after the tiles, the first TOPK slots of every earlier segment whose first block the
row did not keep, gathered BLOCK_N at a time with a per-(row, segment) mask).

Split final rows (SPLIT, plain and chunked prefill): the final rows keep every causal tile
(`ops/select/naive.final_rows`), N / b tiles against a mean row's few, and one program walks a
row's tiles in turn, so at 32K and beyond those one or two rows were the kernel's critical path.
Their tiles are shared among NSPLIT programs each, which write unnormalised partial sums;
`_combine_kernel` merges them (log-sum-exp weights), adds the sink and writes O and LSE.
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from ... import _host
from .._common import LOG2E, cdiv, fallback_tiles, launch_fitting
from ...blocks import BlockList


@triton.jit
def _attend_tile(b_q, b_k, b_v, m_i, l_i, acc, qk_scale, MASK: tl.constexpr, m_allow, IEEE: tl.constexpr,
                 FMA: tl.constexpr, SOFTCAP: tl.constexpr = False, cap_in=1.0, cap_out=1.0):
    # [BLOCK_M, BLOCK_N] raw scores q.k; qk_scale (softmax scale times log2 e) is applied below
    if IEEE:
        b_s = tl.dot(b_q, b_k, input_precision="ieee")
    else:
        b_s = tl.dot(b_q, b_k)
    if SOFTCAP:
        # softcap * tanh(scale * s / softcap) in log2 units (cap_out = softcap * log2 e); the
        # launcher turns FMA off and passes qk_scale = 1, so nothing below rescales it.
        b_x = b_s * cap_in
        b_s = (1.0 - 2.0 / (tl.exp(2.0 * b_x) + 1.0)) * cap_out
    if MASK:
        b_s = tl.where(m_allow, b_s, float("-inf"))
    if FMA:
        # The scale is positive, so the row max can be taken before scaling, and scaling then
        # shifting each score is one fused multiply-add instead of a multiply and a subtract.
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
    else:
        b_s = b_s * qk_scale
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
    if MASK:
        # A row may see no allowed key yet (masked tile first): keep exp2 away from inf - inf.
        # Unmasked tiles always give every row a finite max.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    if FMA:
        b_p = tl.exp2(b_s * qk_scale - m_safe[:, None])
    else:
        b_p = tl.exp2(b_s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision="ieee")
    else:
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc)
    return m_new, l_i, acc


@triton.jit
def _attend_fwd_kernel(
    Q, K, V, POS, IDX, NOFF, NTOT, O, LSE, SINKS, BLK, ORDER, KR, VR, VSEG, VPOS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_pb, stride_ph,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    stride_sb, stride_sh, stride_sq,
    stride_rb, stride_rh, stride_rn, stride_prb, stride_prh,
    N, HQ, G, NQB, qk_scale, M, QOFF, W, cap_in, cap_out, SEG,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    RETURN_LSE: tl.constexpr, IEEE: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
    FMA: tl.constexpr, WINDOW: tl.constexpr, HAS_SINK: tl.constexpr, SOFTCAP: tl.constexpr,
    PACKED: tl.constexpr = False, TOPK: tl.constexpr = 0, VCOMPACT: tl.constexpr = False,
    PAD_D: tl.constexpr = False, SPLIT: tl.constexpr = False, PART=None, NFIN=1, NSPLIT=1,
):
    # HEAD_DIM: the true head dim; BLOCK_D: the next power of two (tl.arange needs one). With
    # PAD_D (80, 96) every load and store is masked to the first HEAD_DIM columns: the zero
    # columns add nothing to q.k and leave zeros in acc's padding, which is never stored.
    # Without it the loads carry no column mask, so 64/128/256 compile as before.
    # Later query blocks keep more tiles: launch them first so the tail of the grid is short.
    # i_l: row of the block list; i_m: the query block's index among the key blocks.
    i_bh = tl.program_id(1)
    i_b = (i_bh // HQ).to(tl.int64)
    i_hq = (i_bh % HQ).to(tl.int64)
    i_h = i_hq // G
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    is_part = False
    i_split = 0
    if PACKED:
        # A packed batch (`pbs_kernels.packing`): ORDER lists the query blocks holding a query,
        # most tiles first; BLK's rows give each block's queries (first and last virtual
        # position) and the offset from virtual position to packed row of q and o.
        i_l = tl.load(ORDER + tl.program_id(0))
        i_m = i_l
        NB_ALL = NQB
        o_m = i_m * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        m_m = (o_m >= tl.load(BLK + 3 * NB_ALL + i_l)) & (o_m <= tl.load(BLK + 4 * NB_ALL + i_l))
        o_r = (o_m + tl.load(BLK + 5 * NB_ALL + i_l)).to(tl.int64)
    else:
        # SPLIT: programs [0, NFIN * NSPLIT) are the splits of the last NFIN rows (split i_s of
        # row NQB - 1 - i_f); the rest are the other rows, most tiles first as without it.
        pid = tl.program_id(0)
        if SPLIT:
            is_part = pid < NFIN * NSPLIT
            i_split = tl.where(is_part, pid % NSPLIT, 0)
            pid = tl.where(is_part, pid // NSPLIT, pid - NFIN * (NSPLIT - 1))
        i_l = NQB - 1 - pid
        i_m = QOFF // BLOCK_SIZE + i_l
        o_m = i_m * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        m_m = (o_m >= QOFF) & (o_m < N)
        o_r = o_m - QOFF  # row of q / o (queries are the last M of the N positions)

    p_q = Q + i_b * stride_qb + i_hq * stride_qh + o_r[:, None] * stride_qn + o_d[None, :]
    # [BLOCK_SIZE, BLOCK_D]
    if PAD_D:
        b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)
    else:
        b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    i_kv = (i_b * (HQ // G) + i_h).to(tl.int32)
    if USE_TMA:
        p_kbase = K
        p_vbase = V
    else:
        p_kbase = K + i_b * stride_kb + i_h * stride_kh
        p_vbase = V + i_b * stride_vb + i_h * stride_vh
    p_pos = POS + i_b * stride_pb + i_h * stride_ph
    p_idx = IDX + i_b * stride_ib + i_hq * stride_ih + i_l * stride_iq
    n_off = tl.load(NOFF + i_b * stride_cb + i_hq * stride_ch + i_l)
    n_tot = tl.load(NTOT + i_b * stride_cb + i_hq * stride_ch + i_l)
    t_lo = 0
    t_hi = n_off
    if SPLIT:
        # A split's share of the unmasked tiles; the masked ones and the vertical keys go to the
        # last split (the others' masked loop is empty).
        t_lo = tl.where(is_part, i_split * n_off // NSPLIT, 0)
        t_hi = tl.where(is_part, (i_split + 1) * n_off // NSPLIT, n_off)
        not_last = is_part & (i_split != NSPLIT - 1)
        n_tot = tl.where(not_last, t_hi, n_tot)
        n_off = tl.where(not_last, t_hi, n_off)

    m_i = tl.full([BLOCK_SIZE], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc = tl.zeros([BLOCK_SIZE, BLOCK_D], dtype=tl.float32)

    # Tiles of earlier segments: full blocks, all keys in the past, no mask.
    for t in tl.range(t_lo, t_hi, warp_specialize=WARP_SPEC):
        j32 = tl.load(p_idx + t)
        i_j = j32.to(tl.int64)
        for i_s in tl.static_range(BLOCK_SIZE // BLOCK_N):
            o_n = i_j * BLOCK_SIZE + i_s * BLOCK_N + tl.arange(0, BLOCK_N)
            if USE_TMA:
                # [BLOCK_D, BLOCK_N], [BLOCK_N, BLOCK_D] through the tensor memory accelerator
                # (columns past HEAD_DIM, if any, are the descriptor's zero fill)
                b_k = tl.trans(K.load([i_kv, j32 * BLOCK_SIZE + i_s * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D))
                b_v = V.load([i_kv, j32 * BLOCK_SIZE + i_s * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)
            elif PAD_D:
                b_k = tl.load(p_kbase + o_n[None, :] * stride_kn + o_d[:, None], mask=m_d[:, None], other=0.0)
                b_v = tl.load(p_vbase + o_n[:, None] * stride_vn + o_d[None, :], mask=m_d[None, :], other=0.0)
            else:
                # [BLOCK_D, BLOCK_N]
                b_k = tl.load(p_kbase + o_n[None, :] * stride_kn + o_d[:, None])
                # [BLOCK_N, BLOCK_D]
                b_v = tl.load(p_vbase + o_n[:, None] * stride_vn + o_d[None, :])
            m_i, l_i, acc = _attend_tile(b_q, b_k, b_v, m_i, l_i, acc, qk_scale, False, None, IEEE, FMA,
                                         SOFTCAP, cap_in, cap_out)

    # Tiles of the query's own segment: mask by original position (and the end of the sequence).
    for t in range(n_off, n_tot):
        j32 = tl.load(p_idx + t)
        i_j = j32.to(tl.int64)
        for i_s in tl.static_range(BLOCK_SIZE // BLOCK_N):
            o_n = i_j * BLOCK_SIZE + i_s * BLOCK_N + tl.arange(0, BLOCK_N)
            m_n = o_n < N
            b_pos = tl.load(p_pos + o_n, mask=m_n, other=2147483647)
            if USE_TMA:
                # Rows past N come back as zeros (the descriptor's bounds are [B*H, N, D]).
                b_k = tl.trans(K.load([i_kv, j32 * BLOCK_SIZE + i_s * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D))
                b_v = V.load([i_kv, j32 * BLOCK_SIZE + i_s * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)
            elif PAD_D:
                b_k = tl.load(p_kbase + o_n[None, :] * stride_kn + o_d[:, None], mask=m_n[None, :] & m_d[:, None],
                              other=0.0)
                b_v = tl.load(p_vbase + o_n[:, None] * stride_vn + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                              other=0.0)
            else:
                b_k = tl.load(p_kbase + o_n[None, :] * stride_kn + o_d[:, None], mask=m_n[None, :], other=0.0)
                b_v = tl.load(p_vbase + o_n[:, None] * stride_vn + o_d[None, :], mask=m_n[:, None], other=0.0)
            # [BLOCK_SIZE, BLOCK_N]
            m_allow = b_pos[None, :] <= o_m[:, None]
            if WINDOW:
                m_allow = m_allow & (b_pos[None, :] > o_m[:, None] - W)
            m_i, l_i, acc = _attend_tile(b_q, b_k, b_v, m_i, l_i, acc, qk_scale, True, m_allow, IEEE, FMA,
                                         SOFTCAP, cap_in, cap_out)

    if TOPK > 0:
        # Vertical keys: slot g * SEG + r (r < TOPK) of each earlier segment g that VSEG marks
        # (its first block not kept by this row). VCOMPACT: KR / VR / VPOS hold just those slots,
        # row c = g * TOPK + r, contiguous; else KR / VR are the raw K / V, read at the slots.
        n_c = (i_m * BLOCK_SIZE // SEG) * TOPK
        if SPLIT:
            n_c = tl.where(is_part & (i_split != NSPLIT - 1), 0, n_c)
        p_seg = VSEG + i_b * stride_sb + i_hq * stride_sh + i_l * stride_sq
        if VCOMPACT:
            p_kr = KR + i_b * stride_rb + i_h * stride_rh
            p_vr = VR + i_b * stride_rb + i_h * stride_rh
            p_pr = VPOS + i_b * stride_prb + i_h * stride_prh
        else:
            p_kr = KR + i_b * stride_kb + i_h * stride_kh
            p_vr = VR + i_b * stride_vb + i_h * stride_vh
        for c0 in range(0, n_c, BLOCK_N):
            o_c = c0 + tl.arange(0, BLOCK_N)
            o_g = o_c // TOPK
            o_n = (o_g * SEG + o_c % TOPK).to(tl.int64)
            m_c = o_c < n_c
            m_c = m_c & (tl.load(p_seg + o_g, mask=m_c, other=0) != 0) & (o_n < N)
            # [BLOCK_D, BLOCK_N] and [BLOCK_N, BLOCK_D] masks (the column mask only with PAD_D)
            if PAD_D:
                m_ck = m_c[None, :] & m_d[:, None]
                m_cv = m_c[:, None] & m_d[None, :]
            else:
                m_ck = m_c[None, :]
                m_cv = m_c[:, None]
            if VCOMPACT:
                o_r64 = o_c.to(tl.int64)
                b_k = tl.load(p_kr + o_r64[None, :] * stride_rn + o_d[:, None], mask=m_ck, other=0.0)
                b_v = tl.load(p_vr + o_r64[:, None] * stride_rn + o_d[None, :], mask=m_cv, other=0.0)
            else:
                b_k = tl.load(p_kr + o_n[None, :] * stride_kn + o_d[:, None], mask=m_ck, other=0.0)
                b_v = tl.load(p_vr + o_n[:, None] * stride_vn + o_d[None, :], mask=m_cv, other=0.0)
            # Keys of earlier segments are all in every query's past: only a window needs positions.
            m_allow = m_c[None, :] & (o_m[:, None] >= 0)
            if WINDOW:
                if VCOMPACT:
                    b_pos = tl.load(p_pr + o_r64, mask=m_c, other=2147483647)
                else:
                    b_pos = tl.load(p_pos + o_n, mask=m_c, other=2147483647)
                m_allow = m_allow & (b_pos[None, :] > o_m[:, None] - W)
            m_i, l_i, acc = _attend_tile(b_q, b_k, b_v, m_i, l_i, acc, qk_scale, True, m_allow, IEEE, FMA,
                                         SOFTCAP, cap_in, cap_out)

    m_out = m_m
    if SPLIT:
        # Unnormalised partial sums of split i_split of final row NQB - 1 - i_l: PART is
        # [B * HQ, NFIN * NSPLIT, BLOCK_SIZE, BLOCK_D + 2] fp32 (acc, then m and l); such a
        # program stores nothing else (masks, not a branch: every program runs the same code).
        i_p = (i_bh.to(tl.int64) * NFIN * NSPLIT + (NQB - 1 - i_l) * NSPLIT + i_split) * BLOCK_SIZE
        o_pm = i_p + tl.arange(0, BLOCK_SIZE)
        m_part = (tl.zeros([BLOCK_SIZE], tl.int32) + is_part.to(tl.int32)) != 0
        tl.store(PART + o_pm[:, None] * (BLOCK_D + 2) + o_d[None, :], acc, mask=m_part[:, None])
        tl.store(PART + o_pm * (BLOCK_D + 2) + BLOCK_D, m_i, mask=m_part)
        tl.store(PART + o_pm * (BLOCK_D + 2) + BLOCK_D + 1, l_i, mask=m_part)
        m_out = m_m & ~m_part

    b_o, b_lse = _finish(acc, m_i, l_i, SINKS, i_hq, HAS_SINK)
    p_o = O + i_b * stride_ob + i_hq * stride_oh + o_r[:, None] * stride_on + o_d[None, :]
    if PAD_D:
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_out[:, None] & m_d[None, :])
    else:
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_out[:, None])
    if RETURN_LSE:
        tl.store(LSE + i_bh.to(tl.int64) * M + o_r, b_lse, mask=m_out)


@triton.jit
def _finish(acc, m_i, l_i, SINKS, i_hq, HAS_SINK: tl.constexpr):
    """The output rows and their natural-log log-sum-exp from a row's running max m_i (log2
    units), sum l_i and weighted values acc, with the head's sink, if any, in the denominator."""
    if HAS_SINK:
        # The sink is one more logit in the denominator with no value: rescale to the larger max.
        b_sink = tl.load(SINKS + i_hq).to(tl.float32) * 1.4426950408889634
        m_fin = tl.maximum(m_i, b_sink)
        alpha = tl.exp2(m_i - m_fin)
        l_i = l_i * alpha + tl.exp2(b_sink - m_fin)
        acc = acc * alpha[:, None]
        m_i = m_fin
    # Every real row saw at least its own key; padded rows (o_m >= N) are never stored.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None], (m_i + tl.log2(l_safe)) / 1.4426950408889634


@triton.jit
def _combine_kernel(PART, O, LSE, SINKS, stride_ob, stride_oh, stride_on, N, HQ, NQB, M, QOFF, NFIN, NSPLIT,
                    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    RETURN_LSE: tl.constexpr, HAS_SINK: tl.constexpr):
    # One program per (final row i_f, batch x query head): merge its NSPLIT partial sums.
    i_f = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // HQ
    i_hq = i_bh % HQ
    i_l = NQB - 1 - i_f
    o_m = (QOFF // BLOCK_SIZE + i_l) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    m_m = (o_m >= QOFF) & (o_m < N)
    o_r = o_m - QOFF
    o_d = tl.arange(0, BLOCK_D)
    p_row = (i_bh * NFIN * NSPLIT + i_f * NSPLIT) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    m_i = tl.full([BLOCK_SIZE], float("-inf"), dtype=tl.float32)
    for s in range(0, NSPLIT):
        m_i = tl.maximum(m_i, tl.load(PART + (p_row + s * BLOCK_SIZE) * (BLOCK_D + 2) + BLOCK_D))
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc = tl.zeros([BLOCK_SIZE, BLOCK_D], dtype=tl.float32)
    for s in range(0, NSPLIT):
        p_s = (p_row + s * BLOCK_SIZE) * (BLOCK_D + 2)
        w = tl.exp2(tl.load(PART + p_s + BLOCK_D) - m_safe)
        l_i += tl.load(PART + p_s + BLOCK_D + 1) * w
        acc += tl.load(PART + p_s[:, None] + o_d[None, :]) * w[:, None]
    b_o, b_lse = _finish(acc, m_i, l_i, SINKS, i_hq, HAS_SINK)
    p_o = O + i_b * stride_ob + i_hq * stride_oh + o_r[:, None] * stride_on + o_d[None, :]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None] & (o_d[None, :] < HEAD_DIM))
    if RETURN_LSE:
        tl.store(LSE + i_bh * M + o_r, b_lse, mask=m_m)


def _check(q, k_perm, v_perm, pos, blocks: BlockList):
    B, HQ, M, D = q.shape
    N = k_perm.shape[2]
    if k_perm.stride(-1) != 1 or v_perm.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("attend: q, k and v need a contiguous last dimension")
    if not pos.is_contiguous() or pos.dtype != torch.int32:
        raise ValueError("attend: pos must be a contiguous int32 tensor")
    for name in ("idx", "n_off", "n_total"):
        t = getattr(blocks, name)
        if not t.is_contiguous() or t.dtype != torch.int32:
            raise ValueError(f"attend: blocks.{name} must be a contiguous int32 tensor")
    if blocks.num_blocks != cdiv(N, blocks.block_size):
        raise ValueError("attend: the block list does not match the sequence length")
    if blocks.q_block0 != (N - M) // blocks.block_size:
        raise ValueError("attend: the block list's first query block does not match q's length")


# Warp specialization of the unmasked loop exists in newer Triton only (feature check, not version).
_HAS_WARP_SPEC = "warp_specialize" in inspect.signature(tl.range.__init__).parameters


def _tma_default(q, k_perm, v_perm) -> bool:
    """Tensor descriptors on Hopper and newer, for 16-bit K/V that are contiguous (the
    descriptor views them as [B*H, N, D]) with a power-of-two head dim.

    Head dims 80 and 96 use pointer loads: a descriptor's box is loaded as one register block,
    so its last dimension would have to be padded to 128 and rely on the hardware's zero fill
    for the columns past D (the rows, 160 and 192 bytes, are 16-byte aligned, so TMA would
    accept the tensor). The CPU interpreter, which follows the same out-of-bounds rule, gives the
    reference's output that way (tests/kernels/test_head_dims.py); the path is not the default
    until it has been checked on a GPU: `scripts/gpu_head_dims.py` runs it (use_tma=True)."""
    if not q.is_cuda or q.dtype == torch.float32:
        return False
    D = q.shape[-1]
    if D != triton.next_power_of_2(D):
        return False
    if not (k_perm.is_contiguous() and v_perm.is_contiguous()):
        return False
    if not _host.LEGACY_HOST:
        hit = _TMA_OK.get(q.device)
        if hit is None:
            hit = _TMA_OK[q.device] = _tma_usable(q.device)
        return hit
    return _tma_usable(q.device)


# device -> whether tensor descriptors apply (a device query per call cost a few us of host time)
_TMA_OK: dict = {}


def _tma_usable(device) -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def attend_tiles(block_size: int, block_d: int, *, wide: bool, use_tma: bool, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a query block of `block_size` rows and a head dim
    padded to `block_d`; `wide`: 16-bit inputs (fp32 tiles take twice the room).

    Measured on an H200 (Triton 3.6, b=128, D=128, bf16, 32K and 128K): BLOCK_N=128 with 8 warps
    gave 420-437 TFLOP/s on computed tiles with pointer loads (3 stages), 436-463 with tensor
    descriptors (2 stages); 4 warps gave ~290; BLOCK_N=64 ~2% less. fp32 tiles need half the
    width to fit shared memory. Head dim 80 / 96 run as 128.

    Head dim 256 (Gemma): the accumulator [128, 256] fp32 alone is 128 registers a thread at 8
    warps, so the key tile halves to 64 columns: K and V tiles of 32 KiB each in bf16, two stages
    (128 KiB) plus Q (64 KiB) within Hopper's 227 KiB of shared memory. fp32 at 256 goes to 32
    columns and one stage. Conservative choices, not yet tuned: scripts/gpu_head_dims.py times
    them against cuDNN.
    """
    if not cuda:
        return (block_size if wide else min(block_size, 64)), 4, 1
    if block_d > 128:
        return (min(block_size, 64) if wide else min(block_size, 32)), 8, (2 if wide else 1)
    block_n = block_size if wide else min(block_size, 64)
    num_warps = 8 if block_size * block_d >= 128 * 128 else 4
    num_stages = (2 if use_tma else 3) if wide else 1
    return block_n, num_warps, num_stages


def attend_triton(q, k_perm, v_perm, pos, blocks: BlockList, *, scale: float, return_lse: bool = False,
                  out: torch.Tensor | None = None, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, use_tma: bool | None = None, warp_specialize: bool = False,
                  fma_softmax: bool = True, window: int | None = None, sinks: torch.Tensor | None = None,
                  softcap: float | None = None, packed=None, vertical_keys: int = 0,
                  segment_size: int | None = None, vertical_compact: bool = True, split: int | None = None):
    """Same contract as `attend_naive`; `out` (like q) receives the output if given. The keyword
    knobs after `out` are for kernel tuning (scripts/gpu_attend_tile_rate.py --variants). `packed`:
    see `attend_packed_triton`. `split`: programs per final row (None: `final_splits`; 1: off)."""
    if packed is None:
        _check(q, k_perm, v_perm, pos, blocks)
    elif return_lse:
        raise ValueError("attend: a packed batch returns no LSE")
    if packed is not None and vertical_keys:
        raise ValueError("attend: a packed batch has no vertical keys (earlier segments may be another sequence's)")
    B, HQ, M, D = q.shape
    N = k_perm.shape[2]
    H = k_perm.shape[1]
    b = blocks.block_size
    nqb = blocks.num_query_blocks
    block_d = triton.next_power_of_2(D)
    if use_tma is None:
        use_tma = _tma_default(q, k_perm, v_perm)
    tiles = attend_tiles(b, block_d, wide=q.dtype != torch.float32, use_tma=use_tma, cuda=q.is_cuda)
    explicit = (block_n, num_warps, num_stages) != (None, None, None)
    tiles = (tiles[0] if block_n is None else block_n, tiles[1] if num_warps is None else num_warps,
             tiles[2] if num_stages is None else num_stages)
    # Tiles asked for are launched as they are (sweeps want the refusal); planned ones step down
    # until they fit (launch_fitting).
    options = [tiles] if explicit else fallback_tiles(*tiles)
    o = torch.empty_like(q) if out is None else out
    lse = torch.empty(B, HQ, M, device=q.device, dtype=torch.float32) if return_lse else o
    if sinks is not None:
        sinks = sinks.to(device=q.device, dtype=torch.float32).contiguous()
    qk_scale = scale * LOG2E
    if softcap is not None:
        # Scores go through tanh before the softmax, so the scale is applied inside the cap.
        cap_in, cap_out, qk_scale, fma_softmax = scale / softcap, softcap * LOG2E, 1.0, False
    else:
        cap_in = cap_out = 1.0
    kr, vr, vpos = k_perm, v_perm, pos
    if vertical_keys:
        vseg = blocks.vertical_segments(segment_size).to(torch.uint8)
        if vertical_compact:
            # The vertical slots, contiguous: [B, H, NSEG * n, D] (2 MiB at 128K, n = 2, H = 8)
            nseg = vseg.shape[-1]
            slots = (torch.arange(nseg, device=q.device)[:, None] * segment_size
                     + torch.arange(vertical_keys, device=q.device)).flatten().clamp(max=N - 1)
            kr, vr = k_perm.index_select(2, slots), v_perm.index_select(2, slots)
            if window is not None:
                vpos = pos.index_select(2, slots)
    else:
        vseg, segment_size = blocks.n_total[..., None], b  # unused (TOPK = 0)
    grid = (nqb, B * HQ)
    if packed is not None:
        grid = (packed.attend_order.numel(), B * HQ)
        nfin, nsplit = 1, 1
    else:
        # The final rows: the last query block, and the one before it when N is not a multiple of
        # b (final_rows: the last b positions span two blocks then).
        nfin = min(nqb, 2 if N % b else 1)
        nsplit = final_splits(blocks.num_blocks, b, window) if split is None else split
        grid = (nqb + nfin * (nsplit - 1), B * HQ)
    part = (torch.empty(B * HQ, nfin * nsplit, b, block_d + 2, device=q.device, dtype=torch.float32)
            if nsplit > 1 else lse)

    def launch(option):
        block_n, num_warps, num_stages = option
        k_arg, v_arg = k_perm, v_perm
        if use_tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            k3 = k_perm.reshape(B * H, N, D)
            v3 = v_perm.reshape(B * H, N, D)
            # The box is [1, block_n, block_d]: for D = 80 / 96 (only when asked for, see _tma_default)
            # the columns past D are out of bounds and come back as zeros.
            k_arg = TensorDescriptor.from_tensor(k3, [1, block_n, block_d])
            v_arg = TensorDescriptor.from_tensor(v3, [1, block_n, block_d])
        _attend_fwd_kernel[grid](
            q, k_arg, v_arg, pos, blocks.idx, blocks.n_off, blocks.n_total, o, lse,
            sinks if sinks is not None else lse,
            lse if packed is None else packed.blk, lse if packed is None else packed.attend_order, kr, vr, vseg, vpos,
            q.stride(0), q.stride(1), q.stride(2),
            k_perm.stride(0), k_perm.stride(1), k_perm.stride(2),
            v_perm.stride(0), v_perm.stride(1), v_perm.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            pos.stride(0), pos.stride(1),
            blocks.idx.stride(0), blocks.idx.stride(1), blocks.idx.stride(2),
            blocks.n_off.stride(0), blocks.n_off.stride(1),
            vseg.stride(0), vseg.stride(1), vseg.stride(2),
            kr.stride(0), kr.stride(1), kr.stride(2), vpos.stride(0), vpos.stride(1),
            N, HQ, HQ // H, nqb, qk_scale, M, N - M, int(window or 0), float(cap_in), float(cap_out), int(segment_size),
            BLOCK_SIZE=b, BLOCK_N=block_n, HEAD_DIM=D, BLOCK_D=block_d, PAD_D=block_d != D,
            RETURN_LSE=return_lse, IEEE=q.dtype == torch.float32, USE_TMA=use_tma,
            WARP_SPEC=warp_specialize and _HAS_WARP_SPEC, FMA=fma_softmax,
            WINDOW=window is not None, HAS_SINK=sinks is not None, SOFTCAP=softcap is not None,
            PACKED=packed is not None, TOPK=int(vertical_keys), VCOMPACT=bool(vertical_keys) and vertical_compact,
            SPLIT=nsplit > 1, PART=part, NFIN=nfin, NSPLIT=nsplit, num_warps=num_warps, num_stages=num_stages,
        )

    key = ("attend", b, block_d, q.dtype, use_tma, packed is not None, bool(vertical_keys), window is not None,
           sinks is not None, softcap is not None, nsplit > 1, q.device)
    launch_fitting(None if explicit else key, options, launch)
    if nsplit > 1:
        _combine_kernel[(nfin, B * HQ)](
            part, o, lse, sinks if sinks is not None else lse, o.stride(0), o.stride(1), o.stride(2),
            N, HQ, nqb, M, N - M, nfin, nsplit, BLOCK_SIZE=b, HEAD_DIM=D, BLOCK_D=block_d,
            RETURN_LSE=return_lse, HAS_SINK=sinks is not None, num_warps=8 if b * block_d >= 128 * 128 else 4)
    return (o, lse) if return_lse else o


# Tiles a final-row program walks at most (final_splits): about a mean row's work at 32K.
SPLIT_TILES = 32


def final_splits(num_blocks: int, block_size: int, window: int | None) -> int:
    """Programs per final row: its tiles (every causal one, or a window's) over SPLIT_TILES, 1
    when they are few. Why: once the final rows kept every causal tile (commit fece5c0), per-call
    GPU time at 9 / 3 / 64 on the H200 rose by 90 us at 8K and 388 us at 32K (BENCHMARKS section
    19), 1.4-1.5 us per final-row tile at both lengths: one program's serial walk, long after the
    other rows had finished. Split, the 32K call took 554 us of GPU time against 972 unsplit in
    the same run (section 20)."""
    tiles = num_blocks if window is None else min(num_blocks, cdiv(window, block_size) + 1)
    return cdiv(tiles, SPLIT_TILES) if tiles > SPLIT_TILES else 1


def attend_packed_triton(q, k_perm, v_perm, pos, blocks: BlockList, layout, *, out: torch.Tensor, scale: float,
                         window: int | None = None, sinks: torch.Tensor | None = None,
                         softcap: float | None = None, **knobs):
    """Packed batches: the contract of `attend_packed_naive` (q and `out` [1, HQ, total_q, D]
    packed rows, K/V and pos in virtual slots, one block-list row per virtual block), writing
    straight into `out`. One program per (query block holding a query, query head)."""
    if blocks.num_blocks != layout.num_blocks or k_perm.shape[2] != layout.n_virtual:
        raise ValueError("attend: the block list does not match the packed layout")
    return attend_triton(q, k_perm, v_perm, pos, blocks, scale=scale, out=out, window=window, sinks=sinks,
                         softcap=softcap, packed=layout, **knobs)
