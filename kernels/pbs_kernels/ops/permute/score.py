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

from ... import _host
from .._common import LOG2E, cdiv, launch_fitting

# Programs to aim for: a few waves on a 132-SM H100 without making chunks so short that each
# program spends its time loading Q.
_TARGET_PROGRAMS = 1024


@triton.jit
def _chunk(CHUNKS, i_c, N, QOFF, TILES_PER_CHUNK, BLOCK_N: tl.constexpr, PACKED: tl.constexpr):
    """Program i_c's key tiles [t0, t1), its sequence's length and query offset, the packed rows
    of its key 0 and query 0, its score column and its sequence. A packed batch
    (`pbs_kernels.packing`) reads them from the chunk table's row (columns C_T0 .. C_SEQ)."""
    if PACKED:
        p_c = CHUNKS + i_c * 8
        t0 = tl.load(p_c)
        t1 = tl.load(p_c + 1)
        n_len = tl.load(p_c + 2)
        q_off = tl.load(p_c + 3)
        k_row0 = tl.load(p_c + 4).to(tl.int64)
        q_row0 = tl.load(p_c + 5).to(tl.int64)
        s_col0 = tl.load(p_c + 6).to(tl.int64)
        i_seq = tl.load(p_c + 7)
    else:
        t0 = i_c * TILES_PER_CHUNK
        t1 = tl.minimum(t0 + TILES_PER_CHUNK, tl.cdiv(N, BLOCK_N))
        n_len = N
        q_off = QOFF
        k_row0 = tl.zeros([], dtype=tl.int64)
        q_row0 = tl.zeros([], dtype=tl.int64)
        s_col0 = tl.zeros([], dtype=tl.int64)
        i_seq = 0
    return t0, t1, n_len, q_off, k_row0, q_row0, s_col0, i_seq


@triton.jit
def _lse_pass(
    Q, K, MPART, LPART, CHUNKS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    N, HQ, G, NC, TILES_PER_CHUNK, qk_scale, QOFF,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    PACKED: tl.constexpr = False, BLOCK_D: tl.constexpr = 0, PAD_D: tl.constexpr = False,
):
    i_c = tl.program_id(0)
    i_bhq = tl.program_id(1)
    i_b = (i_bhq // HQ).to(tl.int64)
    i_hq = (i_bhq % HQ).to(tl.int64)
    i_h = i_hq // G
    t0, t1, n_len, q_off, k_row0, q_row0, _, _ = _chunk(CHUNKS, i_c, N, QOFF, TILES_PER_CHUNK, BLOCK_N, PACKED)

    o_m = tl.arange(0, BLOCK_M)
    # BLOCK_D: HEAD_DIM rounded up to a power of two; with PAD_D (80, 96) loads are masked to
    # HEAD_DIM columns and the zero columns add nothing to the products.
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    q_pos = n_len - BLOCK_M + o_m
    # [BLOCK_M, BLOCK_D], resident for the whole chunk
    # (Q's rows are the last n_len - q_off of the n_len positions: a chunk against its cached
    # prefix; q_row0: the packed row of query 0)
    p_q = Q + i_b * stride_qb + i_hq * stride_qh + (q_row0 + q_pos - q_off)[:, None] * stride_qn + o_d[None, :]
    if PACKED:
        # a packed sequence may have fewer queries than a block: the rows before them score nothing
        m_q = (q_pos >= q_off)[:, None]
        if PAD_D:
            m_q = m_q & m_d[None, :]
        b_q = tl.load(p_q, mask=m_q, other=0.0)
    elif PAD_D:
        b_q = tl.load(p_q, mask=m_d[None, :], other=0.0)
    else:
        b_q = tl.load(p_q)
    p_k0 = K + i_b * stride_kb + i_h * stride_kh + o_d[:, None] + k_row0 * stride_kn

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(t0, t1):
        o_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        # [BLOCK_D, BLOCK_N]
        if PACKED:
            o_kn = o_n.to(tl.int64)  # a packed batch's rows times the stride can pass 2^31
        else:
            o_kn = o_n
        if PAD_D:
            b_kt = tl.load(p_k0 + o_kn[None, :] * stride_kn, mask=(o_n[None, :] < n_len) & m_d[:, None], other=0.0)
        else:
            b_kt = tl.load(p_k0 + o_kn[None, :] * stride_kn, mask=o_n[None, :] < n_len, other=0.0)
        if IEEE:
            b_s = tl.dot(b_q, b_kt, input_precision="ieee")
        else:
            b_s = tl.dot(b_q, b_kt)
        b_s = b_s * qk_scale
        if t * BLOCK_N + BLOCK_N > n_len - BLOCK_M:  # only the last tiles meet the causal edge
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
    Q, K, LSE, SCORE, CHUNKS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    N, HQ, G, TILES_PER_CHUNK, qk_scale, QOFF, NS, NSEQ,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    PACKED: tl.constexpr = False, BLOCK_D: tl.constexpr = 0, PAD_D: tl.constexpr = False,
):
    # NS: length of a score row (N, or the virtual length of a packed batch); NSEQ: sequences
    # whose LSE rows LSE holds side by side (1 unless packed).
    i_c = tl.program_id(0)
    i_bhq = tl.program_id(1)
    i_b = (i_bhq // HQ).to(tl.int64)
    i_hq = (i_bhq % HQ).to(tl.int64)
    i_h = i_hq // G
    t0, t1, n_len, q_off, k_row0, q_row0, s_col0, i_seq = _chunk(CHUNKS, i_c, N, QOFF, TILES_PER_CHUNK, BLOCK_N,
                                                                 PACKED)

    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    q_pos = n_len - BLOCK_M + o_m
    # [BLOCK_D, BLOCK_M]: Q transposed, so the product is keys x queries
    p_qt = Q + i_b * stride_qb + i_hq * stride_qh + (q_row0 + q_pos - q_off)[None, :] * stride_qn + o_d[:, None]
    if PACKED:
        m_q = q_pos >= q_off
        if PAD_D:
            b_qt = tl.load(p_qt, mask=m_q[None, :] & m_d[:, None], other=0.0)
        else:
            b_qt = tl.load(p_qt, mask=m_q[None, :], other=0.0)
    elif PAD_D:
        b_qt = tl.load(p_qt, mask=m_d[:, None], other=0.0)
    else:
        b_qt = tl.load(p_qt)
    b_lse = tl.load(LSE + (i_bhq.to(tl.int64) * BLOCK_M + o_m) * NSEQ + i_seq)
    p_k0 = K + i_b * stride_kb + i_h * stride_kh + o_d[None, :] + k_row0 * stride_kn
    p_out = SCORE + i_bhq.to(tl.int64) * NS + s_col0

    for t in range(t0, t1):
        o_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < n_len
        # [BLOCK_N, BLOCK_D]
        if PACKED:
            o_kn = o_n.to(tl.int64)  # a packed batch's rows times the stride can pass 2^31
        else:
            o_kn = o_n
        if PAD_D:
            b_k = tl.load(p_k0 + o_kn[:, None] * stride_kn, mask=m_n[:, None] & m_d[None, :], other=0.0)
        else:
            b_k = tl.load(p_k0 + o_kn[:, None] * stride_kn, mask=m_n[:, None], other=0.0)
        if IEEE:
            b_st = tl.dot(b_k, b_qt, input_precision="ieee")
        else:
            b_st = tl.dot(b_k, b_qt)
        b_st = b_st * qk_scale
        if t * BLOCK_N + BLOCK_N > n_len - BLOCK_M:
            b_st = tl.where(o_n[:, None] <= q_pos[None, :], b_st, float("-inf"))
        # [BLOCK_N, BLOCK_M] -> [BLOCK_N]: probability mass each key gets from this head's query rows
        b_e = tl.exp2(b_st - b_lse[None, :])
        if PACKED:
            b_e = tl.where(m_q[None, :], b_e, 0.0)
        b_p = tl.sum(b_e, 1)
        tl.store(p_out + o_n, b_p, mask=m_n)


@triton.jit
def _lse_combine(MPART, LPART, LSE, R, NC, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Each query row's log2-sum-exp2 from pass 1's (max, sum) per chunk: one launch where torch
    # took seven (max, subtract, exp2, multiply, sum, log2, add), each ~5-40 us of host time at
    # 8K tokens and 9 heads, where the whole permutation is ~0.1 ms of GPU time.
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, NC, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_rc = m_r[:, None] & (o_c < NC)[None, :]
        # [BLOCK_R, BLOCK_C]
        b_mp = tl.load(MPART + o_r.to(tl.int64)[:, None] * NC + o_c[None, :], mask=m_rc, other=float("-inf"))
        b_lp = tl.load(LPART + o_r.to(tl.int64)[:, None] * NC + o_c[None, :], mask=m_rc, other=0.0)
        b_new = tl.maximum(b_m, tl.max(b_mp, 1))
        # Every row sees key 0 in chunk 0, so b_new is finite after the first tile of chunks;
        # chunks past a row's causal edge hold -inf and weigh 0.
        b_safe = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_l = b_l * tl.exp2(b_m - b_safe) + tl.sum(b_lp * tl.exp2(b_mp - b_safe[:, None]), 1)
        b_m = b_new
    tl.store(LSE + o_r, b_m + tl.log2(b_l), mask=m_r)


def _chunking(n_tiles: int, rows: int) -> tuple[int, int]:
    """(tiles per chunk, chunks) so that rows x chunks is near _TARGET_PROGRAMS."""
    want_chunks = max(1, _TARGET_PROGRAMS // max(rows, 1))
    per = max(1, cdiv(n_tiles, want_chunks))
    return per, cdiv(n_tiles, per)


def score_tiles(head_dim: int, wide: bool) -> tuple[dict, int, int]:
    """Head-dim part of the score kernels' launch: (the HEAD_DIM / BLOCK_D / PAD_D constexprs,
    num_warps, the most pipeline stages). At 256 (Gemma) 8 warps, so the resident [b, 256] query
    block (64 KiB in bf16) is not held by 128 threads, and fewer stages of [BLOCK_N, 256] key
    tiles (fp32: one) to stay within shared memory. Unmeasured, conservative choices;
    scripts/gpu_head_dims.py times the whole call. `wide`: 16-bit inputs."""
    block_d = triton.next_power_of_2(head_dim)
    dims = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, PAD_D=block_d != head_dim)
    if block_d > 128:
        return dims, 8, (2 if wide else 1)
    return dims, 4, 3


def _launch_pass(kernel, grid, args: tuple, meta: dict, explicit: bool) -> None:
    """One score pass with `meta`'s stages, or with one stage where those do not fit the device
    (`launch_fitting`; head dim 256 is the case that can)."""
    options = [meta] if explicit or meta["num_stages"] == 1 else [meta, {**meta, "num_stages": 1}]
    key = (kernel, meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"], meta["IEEE"],
           meta.get("PACKED", False), meta["num_warps"], meta["num_stages"])
    launch_fitting(None if explicit else key, options, lambda m: kernel[grid](*args, **m))


def score_keys_per_head(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float,
                        block_n: int = 64, num_warps: int | None = None, num_stages: int | None = None,
                        tiles_per_chunk: int | None = None) -> torch.Tensor:
    """Sum over the last `block_size` query rows of each query head's softmax, per key (q may
    hold the last M >= block_size of k's N positions):
    [B * HQ, N] float32 (heads of one KV group adjacent). `score_keys_triton` is its group mean.
    The keyword knobs after `scale` are for kernel tuning (scripts/gpu_permute_variants.py)."""
    B, HQ, M, D = q.shape
    H, N = k.shape[1], k.shape[2]
    BLOCK_M = block_size
    dims, warps, stages = score_tiles(D, q.dtype != torch.float32)
    explicit = num_stages is not None
    if num_stages is None:
        # Measured on an H200 at 128K (Triton 3.6, D=128): 3 stages 0.68 ms, 2 stages 0.77 ms.
        num_stages = stages if q.is_cuda else 1
    num_warps = warps if num_warps is None else num_warps
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
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages, **dims,
    )
    grid = (NC, B * HQ)
    _launch_pass(_lse_pass, grid, (q, k, m_part, l_part, m_part), dict(NC=NC, **common), explicit)
    if _host.LEGACY_HOST:
        m_part = m_part.view(-1, NC)
        l_part = l_part.view(-1, NC)
        m_row = m_part.amax(dim=1, keepdim=True)
        # log2-sum-exp2 per query row; every row sees at least key 0, so m_row is finite (chunks
        # past a row's causal edge hold -inf and weigh 0).
        lse = (m_row + torch.log2((l_part * torch.exp2(m_part - m_row)).sum(dim=1, keepdim=True))).view(-1)
    else:
        rows = B * HQ * BLOCK_M
        lse = torch.empty(rows, device=dev, dtype=torch.float32)
        _lse_combine[(cdiv(rows, 64),)](m_part, l_part, lse, rows, NC, BLOCK_R=64,
                                        BLOCK_C=max(16, min(64, triton.next_power_of_2(NC))), num_warps=4)
    per_head = torch.empty(B * HQ, N, device=dev, dtype=torch.float32)
    _launch_pass(_sum_pass, grid, (q, k, lse.contiguous(), per_head, per_head), dict(NS=N, NSEQ=1, **common), explicit)
    return per_head


def score_keys_packed_triton(q: torch.Tensor, k: torch.Tensor, layout, *, block_size: int, scale: float,
                             num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Packed batches (`pbs_kernels.packing`): every sorted sequence's keys scored by its own
    last query block (the rows before a short chunk's first query score nothing), in one launch
    per pass over the layout's chunk table. q [1, HQ, total_q, D], k [1, H, total_k, D] packed
    rows -> [HQ, n_virtual] float32 per query head, as `score_keys_per_head` (the columns of
    sequences that are not sorted are left unwritten)."""
    from ...packing import SCORE_BLOCK_N

    _, HQ, _, D = q.shape
    H = k.shape[1]
    BLOCK_M = block_size
    dims, warps, stages = score_tiles(D, q.dtype != torch.float32)
    explicit = num_stages is not None
    if num_stages is None:
        num_stages = stages if q.is_cuda else 1
    num_warps = warps if num_warps is None else num_warps
    NC, n_seq = layout.chunks.shape[0], layout.n_scored
    dev = q.device
    m_part = torch.empty(HQ * BLOCK_M * NC, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    common = dict(
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        N=0, HQ=HQ, G=HQ // H, TILES_PER_CHUNK=0, qk_scale=scale * LOG2E, QOFF=0,
        BLOCK_M=BLOCK_M, BLOCK_N=SCORE_BLOCK_N, IEEE=q.dtype == torch.float32, PACKED=True,
        num_warps=num_warps, num_stages=num_stages, **dims,
    )
    grid = (NC, HQ)
    _launch_pass(_lse_pass, grid, (q, k, m_part, l_part, layout.chunks), dict(NC=NC, **common), explicit)
    # Each row's log2-sum-exp2 over its own sequence's chunks: [HQ * BLOCK_M, n_seq]
    m_part = m_part.view(-1, NC)
    l_part = l_part.view(-1, NC)
    seq = layout.chunk_seq.expand_as(m_part)
    m_seq = torch.full((m_part.shape[0], n_seq), float("-inf"), device=dev).scatter_reduce_(1, seq, m_part, "amax")
    w = l_part * torch.exp2(m_part - m_seq.gather(1, seq))
    lse = m_seq + torch.log2(torch.zeros_like(m_seq).index_add_(1, layout.chunk_seq, w))
    per_head = torch.empty(HQ, layout.n_virtual, device=dev, dtype=torch.float32)
    _launch_pass(_sum_pass, grid, (q, k, lse.contiguous(), per_head, layout.chunks),
                 dict(NS=layout.n_virtual, NSEQ=n_seq, **common), explicit)
    return per_head


def score_keys_triton(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float,
                      **knobs) -> torch.Tensor:
    """Same contract as `score_keys_naive`; needs M >= block_size."""
    B, HQ, _, _ = q.shape
    H, N = k.shape[1], k.shape[2]
    G = HQ // H
    per_head = score_keys_per_head(q, k, block_size=block_size, scale=scale, **knobs)
    return per_head.view(B, H, G, N).sum(dim=2) * (1.0 / (G * block_size))
