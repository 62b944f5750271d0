"""Plain-torch reference of the permuted block-sparse attention forward (docs/design.md, "The method", step 3).

Works one query block at a time and gathers only the kept key blocks, so memory stays
O(N * kept) rather than N x N.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ...blocks import BlockList


def attend_blocks_naive(q, k_perm, v_perm, pos, blocks: BlockList, query_blocks: Iterable[int], *, scale: float):
    """Exact fp32 attention over the kept tiles, for the query blocks `query_blocks` only.

    Returns (out [B, HQ, R, D] fp32, lse [B, HQ, R] fp32 natural log, rows [R] long: the query
    positions of those R rows). K/V rows are gathered from each query head's KV head directly,
    so grouped-query attention makes no copy of K/V.
    """
    B, HQ, N, D = q.shape
    G = HQ // k_perm.shape[1]
    b = blocks.block_size
    dev = q.device
    bi = torch.arange(B, device=dev)[:, None, None]
    hi = (torch.arange(HQ, device=dev) // G)[None, :, None]
    outs, lses, rows = [], [], []
    for i in query_blocks:
        r0, r1 = i * b, min(N, (i + 1) * b)
        cnt = blocks.n_total[:, :, i].long()  # [B, HQ]
        w = max(1, int(cnt.max()))
        ids = blocks.idx[:, :, i, :w].long()  # [B, HQ, w]
        slot = (ids[..., None] * b + torch.arange(b, device=dev)).reshape(B, HQ, w * b)
        ok = torch.arange(w, device=dev)[None, None, :, None] < cnt[..., None, None]
        ok = ok.expand(B, HQ, w, b).reshape(B, HQ, w * b) & (slot < N)
        slot = torch.where(ok, slot, 0)
        kk = k_perm[bi, hi, slot].float()  # [B, HQ, w*b, D]
        vv = v_perm[bi, hi, slot].float()
        kpos = pos[bi, hi, slot].long()
        qpos = torch.arange(r0, r1, device=dev)
        # Off-diagonal tiles hold only past keys, so one positional mask is right for all tiles.
        allowed = ok[:, :, None, :] & (kpos[:, :, None, :] <= qpos[None, None, :, None])
        s = torch.einsum("bhmd,bhnd->bhmn", q[:, :, r0:r1].float(), kk) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.einsum("bhmn,bhnd->bhmd", torch.exp(s - row_lse[..., None]), vv))
        lses.append(row_lse)
        rows.append(qpos)
        del kk, vv, s
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), torch.cat(rows)


def attend_naive(q, k_perm, v_perm, pos, blocks: BlockList, *, scale: float, return_lse: bool = False):
    """q: [B, HQ, N, D]; k_perm, v_perm: [B, H, N, D]; pos: [B, H, N] original position of each
    permuted slot. Returns o [B, HQ, N, D] in q's dtype (and lse [B, HQ, N] float32, natural log)."""
    out, lse, _ = attend_blocks_naive(q, k_perm, v_perm, pos, blocks, range(blocks.num_blocks), scale=scale)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
