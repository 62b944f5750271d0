"""Test data and error measures; the fp32 references themselves are pbs_kernels.reference."""
from __future__ import annotations

import torch
from pbs_kernels.reference import dense_reference, masked_reference, token_mask  # noqa: F401


def dense_ref(q, k, v, scale=None):
    """Dense causal attention in fp32 with grouped-query heads."""
    return dense_reference(q, k, v, scale)


masked_ref = masked_reference


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
