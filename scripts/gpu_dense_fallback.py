"""The dense fallback at short prompts: cuDNN on K/V copied per query head (the bench's dense
reference, copy not timed), cuDNN with grouped heads, and pbs_attention below min_seq_len.

    python scripts/gpu_dense_fallback.py [--seq-len 8192]

Three alternating rounds of do_bench medians, so clock drift shows up as spread.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from pbs_kernels import pbs_attention
from pbs_kernels.attention import dense_causal_attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=8192)
    n = ap.parse_args().seq_len
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kx, vx = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)

    def cudnn(kk, vv, gqa):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

    ways = {
        "cudnn, K/V copied beforehand": lambda: cudnn(kx, vx, False),
        "cudnn, copy inside": lambda: cudnn(k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), False),
        "cudnn, grouped heads": lambda: cudnn(k, v, True),
        "dense_causal_attention": lambda: dense_causal_attention(q, k, v),
        "pbs_attention, min_seq_len 16384": lambda: pbs_attention(q, k, v, min_seq_len=16384),
    }
    ref = ways["cudnn, K/V copied beforehand"]()
    for name, fn in ways.items():
        err = ((fn().float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"check {name}: rel diff {err:.1e}")
    times = {name: [] for name in ways}
    for _ in range(3):
        for name, fn in ways.items():
            times[name].append(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    base = min(times["cudnn, K/V copied beforehand"])
    for name, ts in times.items():
        print(f"N={n} {name}: {' / '.join(f'{t:.3f}' for t in ts)} ms; best {base / min(ts):.3f}x of cuDNN on copied K/V")


if __name__ == "__main__":
    main()
