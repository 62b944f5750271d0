"""The attend kernel's tile rate against cuDNN, and permutation / selection times (BENCHMARKS
sections 1 and 3), on a CUDA GPU: correctness on fresh random data first, then timings.

    python scripts/gpu_attend_tile_rate.py [--lens 8192,32768,131072] [--variants] [--out DIR]

Per length (B=1, 32 / 8 heads, D 128, bf16): dense SDPA (cuDNN, flash), permute, select (torch
and Triton), and the attend kernel on a fixed random budget of earlier blocks per row and on all
causal tiles: TFLOP/s of the computed tiles over cuDNN's dense causal rate. --variants times the
kernel knobs (tensor descriptors, stages, FMA softmax) instead of the defaults. Prints one JSON
row per measurement (medians of triton.testing.do_bench); writes attend_tile_rate.json to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from pbs_kernels import pbs_attention
from pbs_kernels.attention import dense_causal_attention
from pbs_kernels.ops.attend.fwd import attend_triton
from pbs_kernels.ops.attend.naive import attend_naive
from pbs_kernels.ops.permute import permute_keys
from pbs_kernels.blocks import BlockList, block_geometry
from pbs_kernels.ops.select import select_blocks
from pbs_kernels.ops.select.naive import compact
from pbs_kernels.settings import PbsSettings


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sdpa(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

    def run():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    return run


def budget_blocks(B, HQ, N, b, S, budget, device, seed=0):
    """Artificial kept lists: `budget` random earlier-segment blocks per query block + own segment."""
    g = torch.Generator(device=device).manual_seed(seed)
    nb, seg, last_q = block_geometry(N, b, S, device)
    earlier = seg[None, :] < seg[:, None]
    r = torch.rand(B, HQ, nb, nb, device=device, generator=g).masked_fill(~earlier, -1)
    kth = torch.topk(r, min(budget, nb), dim=-1).values[..., -1:]
    off = (r >= kth) & earlier
    off[..., 0] |= earlier[:, 0]
    same = seg[None, :] == seg[:, None]
    diag = (same & (torch.arange(nb, device=device)[None, :] * b <= last_q[:, None])).expand(B, HQ, nb, nb)
    return compact(off, diag, b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="8192,32768,131072")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = "cuda"
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    HQ, H, D, B = 32, 8, 128, 1
    dt = torch.bfloat16
    rows = []

    # Correctness on fresh random data (bf16), at odd lengths.
    for N, tau in ((8191, 1.0), (8191, 0.9), (32768, 0.9)):
        torch.manual_seed(int(time.time()) % 10000)
        q = torch.randn(B, HQ, N, D, device=dev, dtype=dt)
        k = torch.randn(B, H, N, D, device=dev, dtype=dt)
        v = torch.randn(B, H, N, D, device=dev, dtype=dt)
        if tau == 1.0:
            o = pbs_attention(q, k, v, threshold=1.0)
            err = rel(o, dense_causal_attention(q.float(), k.float(), v.float()))
        else:
            kp, vp, pos = permute_keys(q, k, v, block_size=128, segment_size=256, scale=D ** -0.5, backend="triton")
            bl = select_blocks(q, kp, pos, PbsSettings(block_size=128, segment_size=256, threshold=tau, scale=D ** -0.5,
                                                       backend="torch"))
            o = torch.full_like(q, float("nan"))
            attend_triton(q, kp, vp, pos, bl, scale=D ** -0.5, out=o)
            sub = slice(0, 4)
            ref = attend_naive(q[:, sub].float(), kp[:, :1].float(), vp[:, :1].float(), pos[:, :1],
                               BlockList(bl.idx[:, sub].contiguous(), bl.n_off[:, sub].contiguous(),
                                         bl.n_total[:, sub].contiguous(), 128), scale=D ** -0.5)
            err = rel(o[:, sub], ref)
            assert not torch.isnan(o).any()
        print(f"check N={N} tau={tau}: rel err {err:.2e}", flush=True)
        assert err < 2e-2, err

    for N in [int(x) for x in args.lens.split(",")]:
        q = torch.randn(B, HQ, N, D, device=dev, dtype=dt)
        k = torch.randn(B, H, N, D, device=dev, dtype=dt)
        v = torch.randn(B, H, N, D, device=dev, dtype=dt)
        causal_flops = 4 * B * HQ * D * N * (N + 1) / 2
        rep = 200 if N <= 32768 else 600
        t = {}
        for be in ("cudnn", "flash"):
            try:
                t[be] = do_bench(sdpa(q, k, v, be), warmup=50, rep=rep, return_mode="median")
            except Exception as e:  # noqa: BLE001
                print(f"{be} unavailable: {e}")
        best = min(t.values())
        for be, ms in t.items():
            rows.append(dict(N=N, method=be, ms=ms, tflops=causal_flops / ms / 1e9, density=1.0))
        scale = D ** -0.5
        t_perm = do_bench(lambda: permute_keys(q, k, v, block_size=128, segment_size=256, scale=scale, backend="triton"),
                          warmup=25, rep=100, return_mode="median")
        kp, vp, pos = permute_keys(q, k, v, block_size=128, segment_size=256, scale=scale, backend="triton")
        sel_torch = PbsSettings(block_size=128, segment_size=256, threshold=0.9, scale=scale, backend="torch")
        sel_triton = sel_torch.replace(backend="triton")
        t_sel = do_bench(lambda: select_blocks(q, kp, pos, sel_torch), warmup=25, rep=100, return_mode="median")
        t_sel_tr = do_bench(lambda: select_blocks(q, kp, pos, sel_triton), warmup=25, rep=100, return_mode="median")
        a = select_blocks(q, kp, pos, sel_torch)
        b_ = select_blocks(q, kp, pos, sel_triton)
        agree = (a.n_total == b_.n_total).float().mean().item()
        rows.append(dict(N=N, method="permute", ms=t_perm))
        rows.append(dict(N=N, method="select-torch", ms=t_sel))
        rows.append(dict(N=N, method="select-triton", ms=t_sel_tr, density=agree))
        del a, b_
        # Attend throughput at a fixed per-row budget, and over all causal tiles.
        for name, bl in (("attend-budget", budget_blocks(B, HQ, N, 128, 256, args.budget, dev)),
                         ("attend-all", select_blocks(q, kp, pos, sel_torch.replace(threshold=1.0)))):
            tiles = bl.n_total.sum().item()
            dens = bl.density_per_head().mean().item()
            configs = [dict()]
            if args.variants:
                configs = [dict(use_tma=True, num_stages=2), dict(use_tma=True, num_stages=2, fma_softmax=False),
                           dict(use_tma=True, num_stages=3)]
            for cfg in configs:
                try:
                    ms = do_bench(lambda: attend_triton(q, kp, vp, pos, bl, scale=scale, **cfg), warmup=25, rep=rep,
                                  return_mode="median")
                except Exception as e:  # noqa: BLE001
                    print(f"{name} {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                flops = 4 * D * 128 * 128 * tiles
                rows.append(dict(N=N, method=f"{name}{cfg if cfg else ''}", ms=ms, tflops=flops / ms / 1e9,
                                 density=dens, vs_best_dense_rate=(flops / ms) / (causal_flops / best)))
        del q, k, v, kp, vp, pos
        torch.cuda.empty_cache()
        for r in rows:
            if r["N"] == N:
                print(json.dumps({kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in r.items()}), flush=True)
    with open(os.path.join(args.out, "attend_tile_rate.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
