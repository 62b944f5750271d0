"""Plain-torch reference of the permuted block-sparse attention forward (DESIGN.md §1, step 3).

Works one query block at a time and gathers only the kept key blocks, so memory stays
O(N * kept) rather than N x N.
"""
from __future__ import annotations

import torch

from ..select.naive import BlockList


def attend_naive(q, k_perm, v_perm, pos, blocks: BlockList, *, scale: float, return_lse: bool = False):
    """q: [B, HQ, N, D]; k_perm, v_perm: [B, H, N, D]; pos: [B, H, N] original position of each
    permuted slot. Returns o [B, HQ, N, D] in q's dtype (and lse [B, HQ, N] float32, natural log)."""
    B, HQ, N, D = q.shape
    H = k_perm.shape[1]
    G = HQ // H
    b = blocks.block_size
    nb = blocks.num_blocks
    # Expanded views, no copy: query head h reads KV head h // G.
    kx = k_perm[:, :, None].expand(B, H, G, N, D).reshape(B, HQ, N, D) if G > 1 else k_perm
    vx = v_perm[:, :, None].expand(B, H, G, N, D).reshape(B, HQ, N, D) if G > 1 else v_perm
    px = pos.repeat_interleave(G, dim=1).long()
    out = torch.empty(B, HQ, N, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, HQ, N, dtype=torch.float32, device=q.device)
    for i in range(nb):
        r0, r1 = i * b, min(N, (i + 1) * b)
        cnt = blocks.n_total[:, :, i].long()  # [B, HQ]
        w = int(cnt.max())
        ids = blocks.idx[:, :, i, :w].long()  # [B, HQ, w]
        slot = (ids[..., None] * b + torch.arange(b, device=q.device)).reshape(B, HQ, w * b)
        ok = (torch.arange(w, device=q.device)[None, None, :, None] < cnt[..., None, None])
        ok = ok.expand(B, HQ, w, b).reshape(B, HQ, w * b) & (slot < N)
        slot = torch.where(ok, slot, 0)
        kk = torch.gather(kx, 2, slot[..., None].expand(-1, -1, -1, D)).float()
        vv = torch.gather(vx, 2, slot[..., None].expand(-1, -1, -1, D)).float()
        kpos = torch.gather(px, 2, slot)
        qpos = torch.arange(r0, r1, device=q.device)
        # Off-diagonal tiles hold only past keys, so one positional mask is right for all tiles.
        allowed = ok[:, :, None, :] & (kpos[:, :, None, :] <= qpos[None, None, :, None])
        s = torch.einsum("bhmd,bhnd->bhmn", q[:, :, r0:r1].float(), kk) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        out[:, :, r0:r1] = torch.einsum("bhmn,bhnd->bhmd", torch.exp(s - row_lse[..., None]), vv)
        lse[:, :, r0:r1] = row_lse
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
