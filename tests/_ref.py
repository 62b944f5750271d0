"""Brute-force references for tests: full N x N computations in fp32 (small N only)."""
from __future__ import annotations

import torch


def dense_ref(q, k, v, scale=None):
    """Dense causal attention in fp32 with grouped-query heads."""
    B, HQ, N, D = q.shape
    G = HQ // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    kk = k.float().repeat_interleave(G, 1)
    vv = v.float().repeat_interleave(G, 1)
    s = q.float() @ kk.transpose(-1, -2) * scale
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    return torch.softmax(s, -1) @ vv


def token_mask(blocks, pos, N):
    """[B, HQ, N, N] bool over (query, permuted key slot): kept tile and causal by original position."""
    b = blocks.block_size
    tiles = blocks.dense_mask()  # [B, HQ, nb, nb]
    G = tiles.shape[1] // pos.shape[1]
    m = tiles.repeat_interleave(b, 2).repeat_interleave(b, 3)[..., :N, :N]
    kpos = pos.long().repeat_interleave(G, 1)  # [B, HQ, N]
    qpos = torch.arange(N, device=pos.device)
    return m & (kpos[:, :, None, :] <= qpos[None, None, :, None])


def masked_ref(q, k_perm, v_perm, mask, scale=None):
    B, HQ, N, D = q.shape
    G = HQ // k_perm.shape[1]
    scale = D ** -0.5 if scale is None else scale
    s = q.float() @ k_perm.float().repeat_interleave(G, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v_perm.float().repeat_interleave(G, 1)


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def rand_qkv(B, HQ, H, N, D, dtype=torch.float32, seed=None, device="cpu"):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,))))
    q = torch.randn(B, HQ, N, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    # A few strong keys make the block scores uneven, as real attention is.
    k[:, :, torch.randint(0, N, (max(1, N // 50),), generator=g)] *= 3.0
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)
