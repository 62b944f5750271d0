"""Triton segment sort: the slot order of the permutation straight from per-head key scores.

One program per (segment, batch x KV head) sums the group's query-head scores, sorts the
segment's keys by descending score and writes the int32 original position of every slot. It
replaces a torch group sum, a batched torch.sort with int64 indices and an int64 -> int32 copy
with one pass over the scores (0.167 -> 0.025 ms at 128K tokens on an H100).

Sorting carries the index inside the key: a non-negative float's bit pattern orders like the
float, so (score bits << 32) | (SEG_P2 - 1 - slot) sorted descending gives descending scores and,
among equal scores, the lower original slot first (the stable order of the torch reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_order_kernel(
    SCORE, ORDER, SORT, N, G,
    SEG: tl.constexpr, SEG_P2: tl.constexpr, HAS_SORT: tl.constexpr,
):
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    start = i_s * SEG
    o = tl.arange(0, SEG_P2)
    m = (o < SEG) & (start + o < N)
    p_out = ORDER + i_bh * N + start + o
    full = start + SEG <= N
    if HAS_SORT:
        # packed batches: only the segments the layout marks (full segments of sparse sequences)
        full = full & (tl.load(SORT + i_s) != 0)
    if full:
        b_s = tl.zeros([SEG_P2], dtype=tl.float32)
        for g in range(G):
            b_s += tl.load(SCORE + (i_bh * G + g) * N + start + o, mask=m, other=0.0)
        # Scores are sums of probabilities, never negative: their bits sort like the values.
        bits = b_s.to(tl.int32, bitcast=True).to(tl.int64)
        key = (bits << 32) | (SEG_P2 - 1 - o).to(tl.int64)
        key = tl.where(m, key, -1)  # padding lanes sort last
        key = tl.sort(key, descending=True)
        low = key - ((key >> 32) << 32)
        tl.store(p_out, (start + SEG_P2 - 1 - low).to(tl.int32), mask=m)
    else:
        # A trailing partial segment keeps its order.
        tl.store(p_out, (start + o).to(tl.int32), mask=m)


def segment_order_triton(per_head: torch.Tensor, B: int, H: int, N: int, segment_size: int,
                         sort: torch.Tensor | None = None) -> torch.Tensor:
    """per_head: [B * H * G, N] float32 key scores (a KV group's heads adjacent, as
    `score_keys_per_head` writes them) -> [B, H, N] int32 original position of each slot, the
    same order as `sort_within_segments` on the group sums (and its `sort` flags per segment,
    int32 [N // segment_size]: segments flagged 0 keep their order and their scores are not read)."""
    G = per_head.shape[0] // (B * H)
    order = torch.empty(B, H, N, device=per_head.device, dtype=torch.int32)
    grid = (triton.cdiv(N, segment_size), B * H)
    _segment_order_kernel[grid](per_head, order, order if sort is None else sort, N, G, SEG=segment_size,
                                SEG_P2=triton.next_power_of_2(segment_size), HAS_SORT=sort is not None, num_warps=4)
    return order
