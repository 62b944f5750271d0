"""Selection estimators (`mean`, `top`) and threshold masses (`earlier`, `total`) on a CUDA GPU:
error, density, speed and selection efficiency on the vertical-slash and the default synthetic
workloads, the fixed overhead of a call and the tile rate (BENCHMARKS section 8; issue 14).

    python scripts/gpu_select_estimators.py [--len 131072] [--small 32768] [--out DIR]

1. Correctness on fresh random data: the Triton selection equals the torch reference (tiles) for
   every estimator x threshold mass on odd shapes; threshold 1.0 equals dense attention.
2. Per config at --len: density, computed work, output error against an fp32 dense reference,
   pbs_attention time (do_bench median) and speedup over cuDNN; selection efficiency from
   `analyze_layer` at --small (and at --len for the configs in BIG_ANALYZE).
3. Fixed overhead: full call vs plan.attend alone vs a CUDA-graph replay of the full call, and
   profiler kernel times (attend vs the rest).
Prints one table per part; the last lines are the summary. JSON of every row goes to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from pbs_kernels import pbs_attention
from pbs_kernels.analysis import analyze_layer
from pbs_kernels.attention import pbs_plan
from pbs_kernels.metrics import output_error
from pbs_kernels.ops.permute import permute_keys
from pbs_kernels.ops.select import select_blocks_naive
from pbs_kernels.ops.select.fused import select_blocks_triton
from pbs_kernels.reference import dense_reference
from pbs_kernels.settings import PbsSettings
from pbs_kernels.workloads import make_vertical_slash, make_workload

CONFIGS = [  # (estimator, threshold_mass, threshold)
    ("mean", "earlier", 0.9), ("mean", "earlier", 0.99), ("mean", "earlier", 0.999),
    ("top", "earlier", 0.9), ("top", "earlier", 0.95), ("top", "earlier", 0.98), ("top", "earlier", 0.99),
    ("mean", "total", 0.99), ("top", "total", 0.95), ("top", "total", 0.98), ("top", "total", 0.99),
    ("top", "total", 0.995),
]
BIG_ANALYZE = [("mean", "earlier", 0.9), ("top", "earlier", 0.9), ("top", "total", 0.99)]


def med(fn):
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def cudnn_fn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    return run


def fresh_permuted(N=8191):
    """Fresh random bf16 q, k (8 / 2 heads, D 128) with a trend over positions, so rows have
    uneven masses, and k permuted by the Triton path: q, k, kp, pos, key stats."""
    torch.manual_seed(int(time.time() * 1e6) % (2**31))
    q = torch.randn(1, 8, N, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, N, 128, device="cuda", dtype=torch.bfloat16)
    q[..., :4] += 2.0
    k[..., :4] += torch.linspace(-1, 2, N, device="cuda")[:, None].to(torch.bfloat16)
    kp, _, pos, stats = permute_keys(q, k, k, block_size=128, segment_size=256, scale=128 ** -0.5,
                                     backend="triton", block_stats=True)
    return q, k, kp, pos, stats


def check_correctness():
    rows = []
    for est in ("mean", "top"):
        for mass in ("earlier", "total"):
            N = 8191
            q, k, kp, pos, stats = fresh_permuted(N)
            s = PbsSettings(block_size=128, segment_size=256, threshold=0.9, scale=128 ** -0.5, estimator=est,
                            threshold_mass=mass)
            want = select_blocks_naive(q.float(), kp.float(), pos, s)
            got = select_blocks_triton(q, kp, pos, s, key_stats=stats)
            diff = (got.dense_mask() != want.dense_mask()).float().mean().item()
            v = torch.randn_like(k)
            out = pbs_attention(q, k, v, threshold=1.0, estimator=est, threshold_mass=mass, backend="triton")
            err1 = output_error(out, dense_reference(q, k, v))
            rows.append(dict(estimator=est, mass=mass, tile_mismatch=diff, dense_err_tau1=err1))
            print(f"check {est:4s} {mass:7s}: tiles differing from the torch reference {diff:.2e} "
                  f"(TF32 vs fp32 scores), threshold 1.0 vs dense fp32 {err1:.2e}", flush=True)
    return rows


def tile_flops(blocks, b, D):
    return float(blocks.tiles_per_head().sum()) * 4 * b * b * D


def run_workload(name, fn, N, small, configs, big_analyze, out_rows):
    q, k, v = fn(N, device="cuda", dtype=torch.bfloat16, seed=0)
    HQ, D, b = q.shape[1], q.shape[-1], 128
    t_dense = med(cudnn_fn(q, k, v))
    nb = -(-N // b)
    dense_rate = HQ * nb * (nb + 1) / 2 * 4 * b * b * D / (t_dense * 1e-3) / 1e12
    ref = dense_reference(q, k, v)
    qs, ks, vs = fn(small, device="cuda", dtype=torch.bfloat16, seed=0)
    print(f"\n{name} N={N}: cuDNN {t_dense:.3f} ms ({dense_rate:.0f} TFLOP/s on causal tiles)", flush=True)
    hdr = "| workload | estimator | mass | tau | density | work | error | pbs ms | speedup | attend ms | tile TFLOP/s | x cuDNN rate | eff@small | eff@N |"
    print(hdr)
    for est, mass, tau in configs:
        kw = dict(threshold=tau, estimator=est, threshold_mass=mass, backend="triton")
        plan = pbs_plan(q, k, v, **kw)
        out = plan.attend(q)
        err = output_error(out, ref)
        dens = float(plan.blocks.density_per_head().mean())
        work = dens + float(plan.blocks.extra_density_per_head().mean())
        t = med(lambda: pbs_attention(q, k, v, **kw))
        t_att = med(lambda: plan.attend(q))
        rate = tile_flops(plan.blocks, b, D) / (t_att * 1e-3) / 1e12
        a = analyze_layer(qs, ks, PbsSettings(threshold=tau, estimator=est, threshold_mass=mass))
        eff_big = float("nan")
        if (est, mass, tau) in big_analyze:
            eff_big = analyze_layer(q, k, PbsSettings(threshold=tau, estimator=est, threshold_mass=mass)).selection_efficiency
        row = dict(workload=name, N=N, estimator=est, mass=mass, threshold=tau, density=dens, work=work, error=err,
                   pbs_ms=t, cudnn_ms=t_dense, speedup=t_dense / t, attend_ms=t_att, tile_tflops=rate,
                   x_cudnn_rate=rate / dense_rate, eff_small=a.selection_efficiency, recall_small=float(a.pbs_recall.mean()),
                   eff_N=eff_big)
        out_rows.append(row)
        print(f"| {name} | {est} | {mass} | {tau} | {dens:.4f} | {work:.4f} | {err:.4f} | {t:.3f} | {t_dense / t:.2f} | "
              f"{t_att:.3f} | {rate:.0f} | {rate / dense_rate:.2f} | {a.selection_efficiency:.3f} | {eff_big:.3f} |",
              flush=True)
        del plan, out
    del ref
    return q, k, v, t_dense


def overhead(q, k, v, configs, rows):
    from torch.profiler import ProfilerActivity, profile
    print("\n| estimator | mass | tau | density | call ms | attend ms | call - attend | graph replay ms | kernels: attend / rest ms | rest share |")
    for est, mass, tau in configs:
        kw = dict(threshold=tau, estimator=est, threshold_mass=mass, backend="triton")
        plan = pbs_plan(q, k, v, **kw)
        dens = float(plan.blocks.density_per_head().mean())
        t_call = med(lambda: pbs_attention(q, k, v, **kw))
        t_att = med(lambda: plan.attend(q))
        t_graph = float("nan")
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    pbs_attention(q, k, v, **kw)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                gout = pbs_attention(q, k, v, **kw)
            g.replay()
            torch.cuda.synchronize()
            ok = output_error(gout, pbs_attention(q, k, v, **kw))
            t_graph = med(g.replay)
            print(f"graph replay matches eager: {ok:.1e}")
        except Exception as e:  # noqa: BLE001 - a development probe: report and go on
            print(f"graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        for _ in range(3):
            pbs_attention(q, k, v, **kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                pbs_attention(q, k, v, **kw)
            torch.cuda.synchronize()
        att = rest = 0.0
        names = []
        for e in prof.key_averages():
            tt = getattr(e, "self_device_time_total", None)
            tt = e.self_cuda_time_total if tt is None else tt
            if "_attend_fwd_kernel" in e.key:
                att += tt
            else:
                rest += tt
                names.append((tt / 5e3, e.key[:60]))
        att, rest = att / 5e3, rest / 5e3
        rows.append(dict(kind="overhead", estimator=est, mass=mass, threshold=tau, density=dens, call_ms=t_call,
                         attend_ms=t_att, graph_ms=t_graph, kernel_attend_ms=att, kernel_rest_ms=rest,
                         top_rest=sorted(names, reverse=True)[:10]))
        print(f"| {est} | {mass} | {tau} | {dens:.4f} | {t_call:.3f} | {t_att:.3f} | {t_call - t_att:.3f} | {t_graph:.3f} | "
              f"{att:.3f} / {rest:.3f} | {100 * rest / (att + rest):.1f}% |", flush=True)
        for tt, n in sorted(names, reverse=True)[:8]:
            print(f"    {tt:.3f} ms  {n}")
        del plan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--len", type=int, default=131072)
    ap.add_argument("--small", type=int, default=32768)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--parts", default="check,sweep,overhead", help="comma list of check, sweep, overhead")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", __import__("triton").__version__)
    rows = {"check": check_correctness() if "check" in parts else [], "runs": [], "overhead": []}
    if "sweep" in parts:
        q, k, v, _ = run_workload("vertical", make_vertical_slash, args.len, args.small, CONFIGS, BIG_ANALYZE,
                                  rows["runs"])
    else:
        q, k, v = make_vertical_slash(args.len, device="cuda", dtype=torch.bfloat16, seed=0)
    if "overhead" in parts:
        overhead(q, k, v, [("top", "total", 0.9), ("mean", "total", 0.9), ("top", "earlier", 0.9),
                           ("mean", "earlier", 0.9)], rows["overhead"])
    del q, k, v
    if "sweep" in parts:
        q, k, v, _ = run_workload("synthetic", make_workload, args.len, args.small,
                                  [("mean", "earlier", 0.9), ("top", "earlier", 0.9), ("top", "total", 0.98),
                                   ("top", "total", 0.99)], [], rows["runs"])
        if "overhead" in parts:
            overhead(q, k, v, [("mean", "earlier", 0.9)], rows["overhead"])
    with open(os.path.join(args.out, "select_estimators.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    print("\nsummary")
    for r in rows["runs"]:
        print(f"{r['workload']:9s} {r['estimator']:4s} {r['mass']:7s} tau={r['threshold']:<6} dens={r['density']:.4f} "
              f"err={r['error']:.4f} x{r['speedup']:.2f} rate={r['x_cudnn_rate']:.2f} eff32k={r['eff_small']:.3f} effN={r['eff_N']:.3f}")


if __name__ == "__main__":
    main()
