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


def dense_reference(q, k, v, scale: float | None = None, *, budget_bytes: int = 1 << 30, window: int | None = None,
                    sinks: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """Dense causal attention in fp32, [B, HQ, M, D]: query rows in chunks against the keys up
    to the chunk's end, so scores take at most `budget_bytes` (K/V are never copied per head).

    q may hold the last M of k's N positions (bottom-right causal alignment); `window` keeps keys
    with q_pos - window < k_pos <= q_pos; `sinks` [HQ] adds one logit per head to the softmax
    denominator; `softcap` maps scaled scores s to softcap * tanh(s / softcap)."""
    B, HQ, M, D = q.shape
    H, N = k.shape[1], k.shape[2]
    G = HQ // H
    off = N - M
    scale = default_scale(D) if scale is None else float(scale)
    out = torch.empty(B, HQ, M, D, dtype=torch.float32, device=q.device)
    rows = max(16, min(M, budget_bytes // max(1, 4 * G * N)))
    for b in range(B):
        for h in range(H):
            kf = k[b, h].float()
            vf = v[b, h].float()
            for r0 in range(0, M, rows):
                r1 = min(M, r0 + rows)
                c0 = 0 if window is None else max(0, off + r0 - window + 1)  # first key any row sees
                c1 = off + r1
                qf = q[b, h * G:(h + 1) * G, r0:r1].float()  # [G, R, D]
                s = torch.matmul(qf, kf[c0:c1].T) * scale  # [G, R, c1 - c0]
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                kpos = torch.arange(c0, c1, device=q.device)[None, :]
                qpos = torch.arange(off + r0, off + r1, device=q.device)[:, None]
                keep = kpos <= qpos
                if window is not None:
                    keep &= kpos > qpos - window
                s.masked_fill_(~keep, float("-inf"))
                if sinks is not None:
                    sink = sinks[h * G:(h + 1) * G].float().to(q.device)[:, None, None].expand(G, r1 - r0, 1)
                    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
                else:
                    p = torch.softmax(s, dim=-1)
                out[b, h * G:(h + 1) * G, r0:r1] = torch.matmul(p, vf[c0:c1])
                del s, p
    return out


def tile_reference(q, k_perm, v_perm, pos, blocks: BlockList, query_blocks: Iterable[int], scale: float,
                   vertical_keys: int = 0, segment_size: int | None = None):
    """Exact fp32 attention over the kept tiles (and vertical keys) for the query blocks
    `query_blocks` only: (out [B, HQ, R, D] fp32, rows [R] long query positions)."""
    out, _, rows = attend_blocks_naive(q, k_perm, v_perm, pos, blocks, list(query_blocks), scale=scale,
                                       vertical_keys=vertical_keys, segment_size=segment_size)
    return out, rows


def token_mask(blocks: BlockList, pos: torch.Tensor, N: int, M: int | None = None,
               window: int | None = None) -> torch.Tensor:
    """[B, HQ, M, N] bool over (query, permuted key slot): in a kept tile and causal by original
    position (queries: the last M of the N positions; M = N by default), inside `window` if
    given. Small N only."""
    M = N if M is None else M
    b = blocks.block_size
    tiles = blocks.dense_mask()  # [B, HQ, NQB, nb]
    G = tiles.shape[1] // pos.shape[1]
    lead = (N - M) - blocks.q_block0 * b  # rows of the first query block before the chunk
    m = tiles.repeat_interleave(b, 2).repeat_interleave(b, 3)[..., lead:lead + M, :N]
    kpos = pos.long().repeat_interleave(G, 1)  # [B, HQ, N]
    qpos = torch.arange(N - M, N, device=pos.device)
    keep = kpos[:, :, None, :] <= qpos[None, None, :, None]
    if window is not None:
        keep &= kpos[:, :, None, :] > qpos[None, None, :, None] - window
    return m & keep


def masked_reference(q, k_perm, v_perm, mask, scale: float | None = None) -> torch.Tensor:
    """Softmax attention in fp32 over the allowed (query, slot) pairs of `mask` [B, HQ, N, N]."""
    G = q.shape[1] // k_perm.shape[1]
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    s = q.float() @ k_perm.float().repeat_interleave(G, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v_perm.float().repeat_interleave(G, 1)
