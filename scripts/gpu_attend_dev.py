"""Attend-kernel launch variants on the lent GPU (issue 14, tile rate): correctness, then speed.

    python scripts/gpu_attend_dev.py [--lens 32768,131072] [--out DIR]

Variants are `attend_triton` knobs: `persistent` (a fixed grid whose programs walk the rows in
launch order) with `flatten` (the compiler pipelines a row's first loads behind the previous
row's last tiles), stages and pointer loads. Runs 1 and 2 of BENCHMARKS section 12 timed other
knobs (row splits, row orders, register caps), since removed: `git show 2bd3945:scripts/gpu_attend_dev.py`.

1. Correctness on fresh random bf16 data (odd length, whole prompt, chunk, window, vertical keys):
   every variant equals the fp32 torch reference (`attend_naive`).
2. Per workload (the bench's synthetic mix and the vertical-slash workload at the acceptance
   config, the real PBS selection; all causal tiles at 32K): attend time (do_bench median) and
   TFLOP/s on computed tiles for each variant, against cuDNN's dense causal rate at that length.
3. Fixed overhead: the query pooling of selection on a side stream while permutation's score
   kernel runs (memory-bound next to compute-bound work), against the plain call, at --lens' last
   length on the vertical workload at a low density.
Prints markdown tables; JSON of every row goes to --out/rows.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pbs_kernels.attention import pbs_plan
from pbs_kernels.metrics import output_error
from pbs_kernels.ops.attend import attend_naive
from pbs_kernels.ops.attend.fwd import attend_triton
from pbs_kernels.workloads import make_vertical_slash, make_workload

from gpu_select_dev import cudnn_fn, med  # scripts/ is on the path when run as a script

SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 1
VARIANTS = {  # run 4 (run 3: these but the counter, plus VARIANTS_3); runs 1 and 2 (row splits, row orders, register caps): commit 2bd3945
    "base (one program per row)": {},
    "persistent, 1 per SM": dict(persistent=SMS),
    "persistent, 1 per SM, flatten": dict(persistent=SMS, flatten=True),
    "persistent, 1 per SM, rows from a counter": dict(persistent=SMS, steal=True),
    "persistent, 2 per SM, rows from a counter": dict(persistent=2 * SMS, steal=True),
}
VARIANTS_3 = {  # run 3 only (the static share lost by 16-33% on sparse rows)
    "persistent, 2 per SM, flatten": dict(persistent=2 * SMS, flatten=True),
    "persistent, 1 per SM, flatten, 3 stages": dict(persistent=SMS, flatten=True, num_stages=3),
    "persistent, 1 per SM, flatten, pointer loads 3 stages": dict(persistent=SMS, flatten=True, use_tma=False,
                                                                   num_stages=3),
    "pointer loads 3 stages": dict(use_tma=False, num_stages=3),
}
WORKLOADS = [  # (name, maker, plan kwargs, lengths it runs at ("all" = every --lens))
    ("synthetic", make_workload, dict(threshold=0.9), "all"),
    ("vertical vk2", make_vertical_slash, dict(threshold=0.75, vertical_keys=2), "all"),
    ("all tiles", make_workload, dict(threshold=1.0), "32768"),
]


def attend(q, plan, **kw):
    return attend_triton(q, plan.k, plan.v, plan.pos, plan.blocks, scale=plan.scale, window=plan.window,
                         vertical_keys=plan.vertical_keys, segment_size=plan.segment_size, **kw)


def check():
    torch.manual_seed(int(time.time() * 1e6) % (2**31))
    worst = {}
    for N, M, window, n in ((8191, 8191, None, 0), (6007, 1500, None, 0), (7003, 7003, 3000, 0), (8191, 8191, None, 2)):
        q = torch.randn(1, 8, M, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 2, N, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        k[:, :, torch.randint(0, N, (N // 64,), device="cuda")] *= 3.0
        plan = pbs_plan(q, k, v, threshold=0.7, window=window, vertical_keys=n, backend="triton")
        want = attend_naive(q.float(), plan.k.float(), plan.v.float(), plan.pos, plan.blocks, scale=plan.scale,
                            window=plan.window, vertical_keys=n, segment_size=plan.segment_size)
        for name, kw in VARIANTS.items():
            try:
                err = output_error(attend(q, plan, **kw), want)
            except Exception as e:  # a variant that does not compile here (shared memory) is reported
                err = float("inf")
                print(f"check {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            worst[name] = max(worst.get(name, 0.0), err)
    for name, err in worst.items():
        print(f"check {name}: worst error vs fp32 reference {err:.2e}", flush=True)
    return {name for name, err in worst.items() if err < 1e-2}


def overlap(N, rows):
    from unittest import mock

    from pbs_kernels.attention import permute_stage, select_stage
    from pbs_kernels.blocks import pool_query_blocks
    from pbs_kernels.ops.select import fused

    q, k, v = make_vertical_slash(N, device="cuda", dtype=torch.bfloat16, seed=0)
    kw = dict(threshold=0.9, estimator="top", threshold_mass="total")
    side = torch.cuda.Stream()

    def plain():
        keys = permute_stage(q, k, v, backend="triton")
        return select_stage(q, keys, backend="triton", **kw), keys

    def overlapped():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            q_pool = pool_query_blocks(q, 128, 0)
        keys = permute_stage(q, k, v, backend="triton")
        torch.cuda.current_stream().wait_stream(side)
        with mock.patch.object(fused, "pool_query_blocks", lambda *a: q_pool):
            return select_stage(q, keys, backend="triton", **kw), keys

    b1, _ = plain()
    b2, _ = overlapped()
    same = bool(torch.equal(b1.dense_mask(), b2.dense_mask()))
    t_plain, t_over = med(plain), med(overlapped)
    t_pool = med(lambda: pool_query_blocks(q, 128, 0))
    print(f"\noverlap N={N} (vertical, top/total/0.9, density {float(b1.density_per_head().mean()):.3f}): "
          f"permute+select {t_plain:.3f} ms plain, {t_over:.3f} ms with the query pooling on a side stream "
          f"(pooling alone {t_pool:.3f} ms; same tiles: {same})", flush=True)
    rows.append(dict(N=N, workload="overlap", plain_ms=t_plain, overlapped_ms=t_over, pool_ms=t_pool, same=same))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="32768,131072")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/pbs-attend"))
    ap.add_argument("--no-overlap", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import triton
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | bf16, "
          f"B=1, HQ=32, H=8, D=128, block 128, segment 256", flush=True)
    ok = check()
    rows = []
    for N in (int(x) for x in a.lens.split(",")):
        for wname, make, kw, lens in WORKLOADS:
            if lens != "all" and str(N) not in lens.split(","):
                continue
            q, k, v = make(N, device="cuda", dtype=torch.bfloat16, seed=0)
            t_dense = med(cudnn_fn(q, k, v))
            dense_rate = 4.0 * 128 ** 3 * (N // 128) * (N // 128 + 1) / 2 * q.shape[1] / t_dense / 1e9
            plan = pbs_plan(q, k, v, backend="triton", **kw)
            tiles = int(plan.blocks.tiles_per_head().sum())
            flops = 4.0 * 128 * 128 * 128 * tiles
            if plan.vertical_keys:
                flops += 4.0 * 128 * 128 * float(plan.blocks.vertical_keys_per_head(256, plan.vertical_keys).sum())
            base = attend(q, plan)
            print(f"\n{wname} N={N}: cuDNN {t_dense:.2f} ms ({dense_rate:.0f} TFLOP/s), density "
                  f"{float(plan.blocks.density_per_head().mean()):.3f}", flush=True)
            print("| variant | attend ms | TFLOP/s | x cuDNN rate | vs base |")
            print("|---|---|---|---|---|")
            t_base = None
            for name, vk in VARIANTS.items():
                if name not in ok:
                    continue
                diff = output_error(attend(q, plan, **vk), base)
                t = med(lambda: attend(q, plan, **vk))
                t_base = t if t_base is None else t_base
                rate = flops / t / 1e9
                rows.append(dict(N=N, workload=wname, variant=name, ms=t, tflops=rate, x_cudnn=rate / dense_rate,
                                 cudnn_ms=t_dense, diff_vs_base=diff))
                print(f"| {name} | {t:.3f} | {rate:.0f} | {rate / dense_rate:.3f} | {t_base / t:.3f}x "
                      f"(diff {diff:.1e}) |", flush=True)
            del plan, q, k, v, base
            torch.cuda.empty_cache()
    if not a.no_overlap:
        overlap(N, rows)
    with open(os.path.join(a.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
