"""Segment-aligned packing: independent sequences laid end to end in one virtual sequence, so
that every op of PBS runs once for a whole varlen batch (`attention.pbs_attention_varlen`).

Sequence i (N_i keys, its queries the last M_i of them) occupies virtual positions
offset_i .. offset_i + L_i - 1, with offset_i a multiple of segment_size and L_i = N_i rounded up
to one. Its keys sit at offset_i + j; the padding slots after them hold no key (their K/V rows
are zeros and their positions lie after the sequence's last query, so the causal mask removes
them); its queries sit at offset_i + N_i - M_i .. offset_i + N_i - 1. Positions `pos` are
virtual positions, so the position masks of the kernels (causal, own segment, sliding window)
work unchanged; what packing adds is one bound: a query block never selects a key block before
its sequence's first block.

The layout is host data (built once per batch from cu_seqlens and reused by every layer through
a small cache) turned into a few int32 tables on the device:

* per virtual block [NB]: the first key block of its sequence, the offsets that turn virtual
  positions into packed K and Q rows, the end of the sequence's keys, the first and last query
  position the block holds (first > last: none), whether its sequence is dense (every causal
  tile kept), and its sequence's index among the placed ones;
* per segment [NSEG]: whether the permutation sorts it (a full segment of a sparse sequence);
* the query blocks that hold a query, grouped by selection's row-width class, and in the order
  the attend kernel should start them (most tiles first);
* the scoring chunks: runs of key tiles of one sequence, each against its own last query block.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from .blocks import NO_POS, cdiv  # noqa: F401  (NO_POS: packing.NO_POS is public)

# Rows of PackedLayout.blk
KB0, KDELTA, KEND, QLO, QHI, QDELTA, DENSE, BSEQ = range(8)
# Columns of PackedLayout.chunks: tile range, sequence length, query offset (N - M), packed K
# row of key 0, packed Q row of query 0, virtual position of key 0, scored-sequence index
C_T0, C_T1, C_N, C_QOFF, C_KROW, C_QROW, C_VOFF, C_SEQ = range(8)
SCORE_BLOCK_N = 64  # key tile of the scoring kernels (score_keys_per_head's default)
# A packed group's pooled block scores and block list grow with the square of its virtual
# length (a per-sequence loop's with the square of its longest sequence): 1 GiB holds 2048
# blocks, 256K tokens at block 128 and 32 query heads with the "mean" estimator. A larger batch
# is cut into groups, one launch per op per group.
PACKED_TABLE_BYTES = 1 << 30


@dataclass(frozen=True)
class PackedSeq:
    """One placed sequence: its index in the batch, packed rows, virtual offset, dense or not."""

    index: int
    q0: int
    q1: int
    k0: int
    k1: int
    offset: int
    dense: bool

    @property
    def n(self) -> int:
        return self.k1 - self.k0

    @property
    def m(self) -> int:
        return self.q1 - self.q0


@dataclass
class PackedLayout:
    block_size: int
    segment_size: int
    n_virtual: int
    n_batch: int  # sequences in the batch, placed or not
    seqs: list  # PackedSeq, batch order; sequences with no query are not placed
    blk: torch.Tensor  # [8, NB] int32, rows KB0 .. BSEQ
    seg_sort: torch.Tensor  # [NSEG] int32
    qlist: torch.Tensor  # [NQ] int32 query blocks holding a query, grouped by width class
    tables: torch.Tensor  # blk then qlist, one int32 tensor (what the Triton kernels read)
    classes: list  # (row width, start in qlist, count)
    attend_order: torch.Tensor  # [NQ] int32
    chunks: torch.Tensor  # [NC, 8] int32 scoring chunks (NC may be 0)
    chunk_seq: torch.Tensor  # [NC] int64 scored-sequence index of each chunk
    scored: list  # PackedSeq whose segments the permutation sorts, in chunk_seq's numbering
    first_blocks: torch.Tensor  # [S] int64 first block of each placed sequence

    @property
    def num_blocks(self) -> int:
        return self.n_virtual // self.block_size

    @property
    def n_scored(self) -> int:
        return len(self.scored)

    def q_rows(self, device) -> torch.Tensor:
        """The packed query rows of the placed sequences: [sum M_i] int64."""
        return torch.cat([torch.arange(s.q0, s.q1) for s in self.seqs]).to(device)


def row_widths(nb: int, spb: int) -> list[int]:
    """Powers of two from 64 (at least one segment) up to nb: selection's row-width classes."""
    top = 1 << max(0, nb - 1).bit_length()
    widths = [max(64, 1 << max(0, spb - 1).bit_length())]
    while widths[-1] < top:
        widths.append(widths[-1] * 2)
    return widths


def packed_groups(bq: list[int], bk: list[int], *, block_size: int, segment_size: int, heads: int,
                  reps: int = 1) -> list[tuple[int, int]]:
    """Consecutive runs of sequences (first, end) to pack together: the pooled block scores
    (`reps` representatives) and the block list of a group, 4 * heads * (1 + reps) * NB^2
    bytes, stay under PACKED_TABLE_BYTES; a sequence that alone passes it is a group alone."""
    max_nb = math.isqrt(PACKED_TABLE_BYTES // (4 * heads * (1 + reps)))
    groups, first, nb = [], 0, 0
    for i in range(len(bq) - 1):
        own = 0 if bq[i + 1] == bq[i] else cdiv(bk[i + 1] - bk[i], segment_size) * segment_size // block_size
        if nb and nb + own > max_nb:
            groups.append((first, i))
            first, nb = i, 0
        nb += own
    groups.append((first, len(bq) - 1))
    return groups


def build_layout(bq: list[int], bk: list[int], *, block_size: int, segment_size: int, min_seq_len: int,
                 permute: bool, heads: int, device, first: int = 0, last: int | None = None,
                 target_programs: int = 1024) -> PackedLayout:
    """The layout of a batch from host bounds (cu_seqlens as lists), placing its sequences
    first .. last - 1 (default: all). `heads`: query heads (the scoring chunks aim at about
    `target_programs` programs, as `score_keys_per_head` does)."""
    b, S = block_size, segment_size
    spb = S // b
    seqs = []
    off = 0
    for i in range(first, len(bq) - 1 if last is None else last):
        q0, q1, k0, k1 = bq[i], bq[i + 1], bk[i], bk[i + 1]
        if q1 == q0:
            continue
        n = k1 - k0
        seqs.append(PackedSeq(i, q0, q1, k0, k1, off, n <= S or n < min_seq_len))
        off += cdiv(n, S) * S
    n_virtual = off
    nb = n_virtual // b
    blk = torch.empty(8, nb, dtype=torch.int64)
    seg_sort = torch.zeros(n_virtual // S, dtype=torch.int64)
    per_width: dict = {}
    order_keys = []
    scored = []
    widths = row_widths(max([cdiv(s.n, b) for s in seqs] + [1]), spb)
    for si, s in enumerate(seqs):
        j0, j1 = s.offset // b, (s.offset + cdiv(s.n, S) * S) // b
        j = torch.arange(j0, j1)
        qstart = s.offset + s.n - s.m
        qlo = torch.clamp(j * b, min=qstart)
        qhi = torch.clamp((j + 1) * b - 1, max=s.offset + s.n - 1)
        blk[:, j0:j1] = torch.stack([
            torch.full_like(j, j0), torch.full_like(j, s.k0 - s.offset), torch.full_like(j, s.offset + s.n),
            qlo, qhi, torch.full_like(j, s.q0 - qstart), torch.full_like(j, int(s.dense)), torch.full_like(j, si),
        ])
        n_full = s.n // S
        if permute and not s.dense and n_full:
            seg_sort[s.offset // S: s.offset // S + n_full] = 1
            scored.append(s)
        lq0, lq1 = (s.n - s.m) // b, cdiv(s.n, b)  # local query blocks
        for lq in range(lq0, lq1):
            w = next(w for w in widths if lq < (w // spb + 1) * spb)
            per_width.setdefault(w, []).append(j0 + lq)
            order_keys.append((-lq, j0 + lq))
    qlist, classes = [], []
    for w in widths:
        rows = per_width.get(w, [])
        if rows:
            classes.append((w, len(qlist), len(rows)))
            qlist.extend(rows)
    attend_order = [jq for _, jq in sorted(order_keys)]
    # Scoring chunks: each sequence's key tiles in runs, about target_programs programs in all.
    tiles = [cdiv(s.n, SCORE_BLOCK_N) for s in scored]
    want = max(1, target_programs // max(heads, 1))
    per = max(1, cdiv(sum(tiles), want)) if tiles else 1
    chunks, chunk_seq = [], []
    for si, (s, t) in enumerate(zip(scored, tiles)):
        for t0 in range(0, t, per):
            chunks.append([t0, min(t, t0 + per), s.n, s.n - s.m, s.k0, s.q0, s.offset, si])
            chunk_seq.append(si)
    first = [s.offset // b for s in seqs]
    # One host -> device copy for all the tables.
    flat = torch.cat([blk.flatten(), torch.tensor(qlist, dtype=torch.int64), seg_sort,
                      torch.tensor(attend_order, dtype=torch.int64),
                      torch.tensor(chunks, dtype=torch.int64).flatten(), torch.tensor(chunk_seq, dtype=torch.int64),
                      torch.tensor(first, dtype=torch.int64)])
    dev64 = flat.to(device=device)
    dev = dev64.to(torch.int32)
    sizes = [8 * nb, len(qlist), seg_sort.numel(), len(attend_order), 8 * len(chunks), len(chunk_seq), len(first)]
    parts = list(torch.split(dev, sizes))
    parts64 = list(torch.split(dev64, sizes))
    return PackedLayout(
        block_size=b, segment_size=S, n_virtual=n_virtual, n_batch=len(bq) - 1, seqs=seqs,
        blk=parts[0].view(8, nb), qlist=parts[1], tables=dev[:8 * nb + len(qlist)], seg_sort=parts[2],
        classes=classes, attend_order=parts[3],
        chunks=parts[4].view(len(chunks), 8), chunk_seq=parts64[5], scored=scored,
        first_blocks=parts64[6],
    )


_CACHE: dict = {}
_CACHE_SIZE = 8


def packed_layout(bq: list[int], bk: list[int], **kw) -> PackedLayout:
    """`build_layout`, cached: every layer of a forward pass sees the same cu_seqlens."""
    key = (tuple(bq), tuple(bk), tuple(sorted((k, str(v)) for k, v in kw.items())))
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        hit = _CACHE[key] = build_layout(bq, bk, **kw)
    return hit


def slot_valid(pos: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Which virtual slots hold a key: pos [B, H, n_virtual] -> bool, same shape (a slot's key
    is real when its position is before its sequence's end; padding slots are not)."""
    blk = torch.arange(pos.shape[-1], device=pos.device) // layout.block_size
    return pos.long() < layout.blk[KEND].long()[blk]


def packed_sinks(min_pos: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """The block holding each sequence's first key, for every virtual block (its sequence's):
    min_pos [B, H, NB] earliest position per key block -> [B, H, NB] int32. That key is in the
    sequence's first segment, where it is the earliest position."""
    B, H, nb = min_pos.shape
    spb = layout.segment_size // layout.block_size
    first_seg = layout.first_blocks // spb
    segs = min_pos.view(B, H, nb // spb, spb)[:, :, first_seg]  # [B, H, S, spb]
    sink_seq = segs.argmin(-1) + layout.first_blocks  # [B, H, S]
    return sink_seq[:, :, layout.blk[BSEQ].long()].to(torch.int32).contiguous()


def block_counts(layout: PackedLayout) -> torch.Tensor:
    """Keys in each virtual block, [NB] float32: a block's keys are its first slots (only a
    sequence's last, unsorted segment has padding, after its keys)."""
    first = torch.arange(layout.num_blocks, device=layout.blk.device) * layout.block_size
    return torch.clamp(layout.blk[KEND].long() - first, 0, layout.block_size).float()
