"""Plain-torch reference of the permuted block-sparse attention forward (docs/design.md, "The method", step 3).

Works one query block at a time and gathers only the kept key blocks, so memory stays
O(N * kept) rather than N x N.

Serving shapes (docs/serving.md): q may hold only the last M of the N key positions (a chunk
against its cached prefix, bottom-right causal alignment); `window` keeps keys with
q_pos - window < k_pos <= q_pos; `sinks` [HQ] adds one learned logit per head to every softmax
denominator; `softcap` maps scores s to softcap * tanh(s / softcap) before the softmax.

Vertical keys (`vertical_keys` = n > 0, with `segment_size`): a query block also attends to the
first n slots of every earlier segment whose first block it did not keep
(`BlockList.vertical_segments`): after permutation, each segment's strongest keys.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ...blocks import BlockList


def attend_blocks_naive(q, k_perm, v_perm, pos, blocks: BlockList, query_blocks: Iterable[int], *, scale: float,
                        window: int | None = None, sinks: torch.Tensor | None = None,
                        softcap: float | None = None, vertical_keys: int = 0, segment_size: int | None = None):
    """Exact fp32 attention over the kept tiles (and the vertical keys), for the query blocks
    `query_blocks` only (indices among the key blocks, q_block0 .. NB - 1).

    Returns (out [B, HQ, R, D] fp32, lse [B, HQ, R] fp32 natural log (the sink included),
    rows [R] long: the query positions of those R rows). K/V rows are gathered from each query
    head's KV head directly, so grouped-query attention makes no copy of K/V.
    """
    B, HQ, M, D = q.shape
    N = k_perm.shape[2]
    q_off = N - M
    G = HQ // k_perm.shape[1]
    b = blocks.block_size
    dev = q.device
    bi = torch.arange(B, device=dev)[:, None, None]
    hi = (torch.arange(HQ, device=dev) // G)[None, :, None]
    vert = None
    if vertical_keys:
        vert = blocks.vertical_segments(segment_size)  # [B, HQ, NQB, NSEG]
        # slot of each (segment, r < n): the segment's first slots
        vslot = (torch.arange(vert.shape[-1], device=dev)[:, None] * segment_size
                 + torch.arange(vertical_keys, device=dev)).reshape(-1)
    outs, lses, rows = [], [], []
    for i in query_blocks:
        r0, r1 = max(i * b, q_off), min(N, (i + 1) * b)
        li = i - blocks.q_block0
        cnt = blocks.n_total[:, :, li].long()  # [B, HQ]
        w = max(1, int(cnt.max()))
        ids = blocks.idx[:, :, li, :w].long()  # [B, HQ, w]
        slot = (ids[..., None] * b + torch.arange(b, device=dev)).reshape(B, HQ, w * b)
        ok = torch.arange(w, device=dev)[None, None, :, None] < cnt[..., None, None]
        ok = ok.expand(B, HQ, w, b).reshape(B, HQ, w * b) & (slot < N)
        if vert is not None:
            vok = vert[:, :, li].repeat_interleave(vertical_keys, dim=-1) & (vslot < N)
            slot = torch.cat([slot, vslot.expand(B, HQ, -1)], dim=-1)
            ok = torch.cat([ok, vok], dim=-1)
        slot = torch.where(ok, slot, 0)
        kk = k_perm[bi, hi, slot].float()  # [B, HQ, w*b, D]
        vv = v_perm[bi, hi, slot].float()
        kpos = pos[bi, hi, slot].long()
        qpos = torch.arange(r0, r1, device=dev)
        # Off-diagonal tiles hold only past keys, so one positional mask is right for all tiles.
        allowed = ok[:, :, None, :] & (kpos[:, :, None, :] <= qpos[None, None, :, None])
        if window is not None:
            allowed &= kpos[:, :, None, :] > qpos[None, None, :, None] - window
        s = torch.einsum("bhmd,bhnd->bhmn", q[:, :, r0 - q_off:r1 - q_off].float(), kk) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        if sinks is not None:
            sink = sinks.float().to(dev)[None, :, None].expand_as(row_lse)
            row_lse = torch.logaddexp(row_lse, sink)
        outs.append(torch.einsum("bhmn,bhnd->bhmd", torch.exp(s - row_lse[..., None]), vv))
        lses.append(row_lse)
        rows.append(qpos)
        del kk, vv, s
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), torch.cat(rows)


def attend_naive(q, k_perm, v_perm, pos, blocks: BlockList, *, scale: float, return_lse: bool = False,
                 window: int | None = None, sinks: torch.Tensor | None = None, softcap: float | None = None,
                 vertical_keys: int = 0, segment_size: int | None = None):
    """q: [B, HQ, M, D] (the last M of N positions); k_perm, v_perm: [B, H, N, D]; pos: [B, H, N]
    original position of each permuted slot. Returns o [B, HQ, M, D] in q's dtype (and lse
    [B, HQ, M] float32, natural log)."""
    out, lse, _ = attend_blocks_naive(q, k_perm, v_perm, pos, blocks, range(blocks.q_block0, blocks.num_blocks),
                                      scale=scale, window=window, sinks=sinks, softcap=softcap,
                                      vertical_keys=vertical_keys, segment_size=segment_size)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def attend_packed_naive(q, k_perm, v_perm, pos, blocks: BlockList, layout, *, scale: float,
                        window: int | None = None, sinks: torch.Tensor | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Packed batches (`pbs_kernels.packing`): q [1, HQ, total_q, D] in packed rows, K/V and pos
    in virtual slots, one block-list row per virtual block. The queries are put at their virtual
    positions, every block holding a query is computed as `attend_blocks_naive` computes it, and
    the rows come back in packed order: [1, HQ, total_q, D] float32."""
    from ...packing import QDELTA, QHI, QLO

    B, HQ, T, D = q.shape
    b = layout.block_size
    dev = q.device
    vpos = torch.cat([torch.arange(s.offset + s.n - s.m, s.offset + s.n) for s in layout.seqs]).to(dev)
    prow = torch.cat([torch.arange(s.q0, s.q1) for s in layout.seqs]).to(dev)
    qv = q.new_zeros(B, HQ, layout.n_virtual, D)
    qv[:, :, vpos] = q[:, :, prow]
    qblocks = sorted(int(j) for j in layout.attend_order.tolist())
    out, _, rows = attend_blocks_naive(qv, k_perm, v_perm, pos, blocks, qblocks, scale=scale, window=window,
                                       sinks=sinks, softcap=softcap)
    blk = rows // b
    real = (rows >= layout.blk[QLO].long()[blk]) & (rows <= layout.blk[QHI].long()[blk])
    res = torch.empty(B, HQ, T, D, device=dev, dtype=torch.float32)
    res[:, :, rows[real] + layout.blk[QDELTA].long()[blk[real]]] = out[:, :, real]
    return res
