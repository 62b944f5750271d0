"""fp32 references that benchmarks and tests share: what the kernels' outputs are checked against.

* `dense_reference`: dense causal attention with grouped-query heads, in query chunks, so memory
  stays bounded at any length (never N x N for long inputs).
* `tile_reference`: exact attention restricted to a plan's kept tiles, for chosen query blocks.
* `token_mask` / `masked_reference`: brute-force [N, N] forms for small test inputs.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .blocks import BlockList
from .ops.attend.naive import attend_blocks_naive
from .ops._common import default_scale


def dense_reference(q, k, v, scale: float | None = None, *, budget_bytes: int = 1 << 30) -> torch.Tensor:
    """Dense causal attention in fp32, [B, HQ, N, D]: query rows in chunks against the keys up
    to the chunk's end, so scores take at most `budget_bytes` (K/V are never copied per head)."""
    B, HQ, N, D = q.shape
    H = k.shape[1]
    G = HQ // H
    scale = default_scale(D) if scale is None else float(scale)
    out = torch.empty(B, HQ, N, D, dtype=torch.float32, device=q.device)
    rows = max(16, min(N, budget_bytes // max(1, 4 * G * N)))
    for b in range(B):
        for h in range(H):
            kf = k[b, h].float()
            vf = v[b, h].float()
            for r0 in range(0, N, rows):
                r1 = min(N, r0 + rows)
                qf = q[b, h * G:(h + 1) * G, r0:r1].float()  # [G, R, D]
                s = torch.matmul(qf, kf[:r1].T) * scale  # [G, R, r1]
                keep = torch.arange(r1, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
                s.masked_fill_(~keep, float("-inf"))
                out[b, h * G:(h + 1) * G, r0:r1] = torch.matmul(torch.softmax(s, dim=-1), vf[:r1])
                del s
    return out


def tile_reference(q, k_perm, v_perm, pos, blocks: BlockList, query_blocks: Iterable[int], scale: float):
    """Exact fp32 attention over the kept tiles for the query blocks `query_blocks` only:
    (out [B, HQ, R, D] fp32, rows [R] long query positions)."""
    out, _, rows = attend_blocks_naive(q, k_perm, v_perm, pos, blocks, list(query_blocks), scale=scale)
    return out, rows


def token_mask(blocks: BlockList, pos: torch.Tensor, N: int) -> torch.Tensor:
    """[B, HQ, N, N] bool over (query, permuted key slot): in a kept tile and causal by original
    position. Small N only."""
    b = blocks.block_size
    tiles = blocks.dense_mask()  # [B, HQ, nb, nb]
    G = tiles.shape[1] // pos.shape[1]
    m = tiles.repeat_interleave(b, 2).repeat_interleave(b, 3)[..., :N, :N]
    kpos = pos.long().repeat_interleave(G, 1)  # [B, HQ, N]
    qpos = torch.arange(N, device=pos.device)
    return m & (kpos[:, :, None, :] <= qpos[None, None, :, None])


def masked_reference(q, k_perm, v_perm, mask, scale: float | None = None) -> torch.Tensor:
    """Softmax attention in fp32 over the allowed (query, slot) pairs of `mask` [B, HQ, N, N]."""
    G = q.shape[1] // k_perm.shape[1]
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    s = q.float() @ k_perm.float().repeat_interleave(G, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v_perm.float().repeat_interleave(G, 1)
