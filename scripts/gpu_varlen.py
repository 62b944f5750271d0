"""Issue 12, item 2 on the GPU: pbs_attention_varlen with the batch packed into one virtual
sequence (one launch per op, `pbs_kernels.packing`) against the old loop of one pbs_attention
per sequence, dense varlen FlashAttention and per-sequence cuDNN SDPA.

    python scripts/gpu_varlen.py [--threshold 0.9] [--out DIR] [--quick]

1. Correctness on fresh random data (odd lengths, a 1-token sequence, a chunk M < N, a short
   dense one, one with no query): threshold 1.0 equals fp32 dense attention per sequence, also
   with a sliding window, sinks and soft-capping; at --threshold the packed call against the
   per-sequence loop: share of identical kept-tile rows, output difference, both against fp32.
2. Timing (triton.testing.do_bench medians) on packed batches 16 x 4K, 4K+16K+32K+64K and
   64 x 1K (HQ=32, H=8, D=128, bf16, the synthetic workload, one seed per sequence): pbs-packed,
   pbs-per-seq (the old loop), varlen-flash (torch.nn.attention.varlen, when there), dense-per-seq
   (dense_causal_attention per sequence: cuDNN first); GPU ops per call (torch profiler) and
   peak memory per call.
Prints a table per part; JSON of every row goes to --out (default: no file).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench

from pbs_kernels.attention import _varlen_per_sequence, dense_causal_attention, pbs_attention_varlen
from pbs_kernels.metrics import output_error
from pbs_kernels.reference import dense_reference
from pbs_kernels.settings import PbsSettings
from pbs_kernels.workloads import make_workload

HQ, H, D = 32, 8, 128
# (N, M) per sequence of the correctness batch
CHECK_SHAPES = [(5000, 5000), (1, 1), (9000, 1000), (300, 300), (2000, 0), (4097, 4097), (700, 77), (129, 129)]
BATCHES = {"16x4K": [4096] * 16, "4K+16K+32K+64K": [4096, 16384, 32768, 65536], "64x1K": [1024] * 64}


def pack(ts):
    return torch.cat([t[0].transpose(0, 1) for t in ts], dim=0).contiguous()


def cu_of(lens, dev):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)


def random_batch(shapes, dev, seed):
    """shapes (N, M): fresh random q/k/v per sequence, q the last M rows."""
    g = torch.Generator(device=dev).manual_seed(seed)
    seqs = []
    for n, m in shapes:
        q, k, v = (torch.randn(1, h, n, D, device=dev, generator=g) for h in (HQ, H, H))
        k[:, :, torch.randint(0, n, (max(1, n // 50),), device=dev, generator=g)] *= 3.0
        seqs.append((q[:, :, n - m:].bfloat16(), k.bfloat16(), v.bfloat16()))
    q = pack([s[0] for s in seqs])
    k, v = pack([s[1] for s in seqs]), pack([s[2] for s in seqs])
    return q, k, v, cu_of([m for _, m in shapes], dev), cu_of([n for n, _ in shapes], dev), seqs


def correctness(dev, threshold, seed):
    rows = []
    shapes = CHECK_SHAPES
    q, k, v, cu_q, cu_k, seqs = random_batch(shapes, dev, seed)
    mq, mk = max(m for _, m in shapes), max(n for n, _ in shapes)
    for kw in ({}, {"window": 1500}, {"sinks": torch.randn(HQ, device=dev)}, {"softcap": 30.0}):
        out = pbs_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, threshold=1.0, packed=True, **kw)
        worst = 0.0
        for i, (s, (n, m)) in enumerate(zip(seqs, shapes)):
            if m == 0:
                continue
            ref = dense_reference(*s, **kw)[0].transpose(0, 1)
            worst = max(worst, output_error(out[int(cu_q[i]):int(cu_q[i + 1])], ref))
        ok = worst < 2e-2
        rows.append({"check": f"threshold 1.0 vs fp32 dense {kw and list(kw)[0] or 'plain'}", "worst_rel": worst,
                     "ok": ok})
    knobs = dict(threshold=threshold, return_stats=True)
    out, st = pbs_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, packed=True, **knobs)
    ref_out, ref_st = _varlen_per_sequence(q, k, v, cu_q.tolist(), cu_k.tolist(), None,
                                           PbsSettings(threshold=threshold), return_stats=True)
    same = total = 0
    for a, b in zip(st, ref_st):
        if a is None or b is None or b.dense:
            continue
        rows_a = a.blocks.dense_mask().flatten(0, 2)
        rows_b = b.blocks.dense_mask().flatten(0, 2)
        same += int((rows_a == rows_b).all(-1).sum())
        total += rows_a.shape[0]
    diff = output_error(out, ref_out)
    ref32 = pack([dense_reference(*s) for s in seqs if s[0].shape[2]])
    rows.append({"check": f"threshold {threshold}: packed vs per-sequence", "same_tile_rows": same / max(total, 1),
                 "rel_packed_vs_loop": diff, "rel_packed_vs_fp32": output_error(out, ref32),
                 "rel_loop_vs_fp32": output_error(ref_out, ref32),
                 "ok": same / max(total, 1) > 0.99 and diff < 2e-2})
    return rows


def gpu_ops(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def peak_mib(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def timing(dev, name, lens, threshold):
    from pbs_cli.workflows.bench.serving import varlen_dense

    ws = [make_workload(n, HQ, H, D, device=dev, seed=i) for i, n in enumerate(lens)]
    scale = D ** -0.5
    q, k, v = pack([w[0] for w in ws]), pack([w[1] for w in ws]), pack([w[2] for w in ws])
    cu = cu_of(lens, dev)
    longest = max(lens)
    bounds = cu.tolist()
    ref = pack([dense_reference(*w, scale) for w in ws])
    knobs = dict(threshold=threshold, scale=scale)
    per_seq = PbsSettings(**knobs)
    views = [tuple(t for t in w) for w in ws]
    methods = {
        "pbs-packed": lambda: pbs_attention_varlen(q, k, v, cu, cu, longest, longest, packed=True, **knobs),
        "pbs-per-seq": lambda: _varlen_per_sequence(q, k, v, bounds, bounds, None, per_seq),
        "dense-per-seq": lambda: torch.cat([dense_causal_attention(a, b, c, scale=scale)[0].transpose(0, 1)
                                            for a, b, c in views]),
    }
    flash = varlen_dense(q, k, v, cu, cu, longest, longest, scale)
    if flash is not None:
        methods["varlen-flash"] = flash
    _, stats = pbs_attention_varlen(q, k, v, cu, cu, longest, longest, return_stats=True, **knobs)
    density = sum(s.density * n * n for s, n in zip(stats, lens)) / sum(n * n for n in lens)
    rows = []
    for m, fn in methods.items():
        try:
            out = fn()
        except (RuntimeError, NotImplementedError) as e:
            rows.append({"batch": name, "method": m, "note": str(e).splitlines()[0][:120]})
            continue
        err = output_error(out, ref)
        del out
        ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
        rows.append({"batch": name, "method": m, "ms": ms, "rel_err": err, "gpu_ops": gpu_ops(fn),
                     "peak_mib": peak_mib(fn), "density": density if m.startswith("pbs") else 1.0})
    del ws, views, ref, q, k, v
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="the 16 x 4K batch only")
    args = ap.parse_args()
    dev = torch.device("cuda")
    import triton

    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"# part 1: correctness (seed {seed})")
    checks = correctness(dev, args.threshold, seed)
    for r in checks:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print(f"# part 2: timing, threshold {args.threshold}, HQ={HQ} H={H} D={D} bf16, do_bench median ms")
    print(f"  {'batch':16} {'method':14} {'ms':>9} {'vs loop':>8} {'rel_err':>9} {'density':>8} {'gpu ops':>8} "
          f"{'peak MiB':>9}")
    rows = []
    for name, lens in BATCHES.items():
        if args.quick and name != "16x4K":
            continue
        got = timing(dev, name, lens, args.threshold)
        loop = next((r["ms"] for r in got if r["method"] == "pbs-per-seq" and "ms" in r), None)
        for r in got:
            if "ms" not in r:
                print(f"  {name:16} {r['method']:14} unavailable: {r['note']}")
                continue
            rel = f"{loop / r['ms']:.2f}x" if loop else "-"
            print(f"  {name:16} {r['method']:14} {r['ms']:9.3f} {rel:>8} {r['rel_err']:9.2e} {r['density']:8.3f} "
                  f"{r['gpu_ops']:8d} {r['peak_mib']:9.0f}")
        rows += got
    ok = all(r["ok"] for r in checks)
    print(f"# correctness {'OK' if ok else 'FAILED'}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_varlen.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": checks,
                       "rows": rows}, f, indent=1)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
