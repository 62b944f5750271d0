"""Where permutation and selection spend their time at 128K (torch.profiler, CUDA kernels), and
their share of a whole pbs_attention call.

    python scripts/gpu_permute_select_profile.py [--seq-len 131072]

Kernel times come from the profiler, so the share is GPU time by kernel with no host gaps or
clock drift between separately timed parts.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from pbs_kernels import pbs_attention
from pbs_kernels.ops.permute import permute_keys
from pbs_kernels.ops.select import select_blocks
from pbs_kernels.settings import PbsSettings
from pbs_kernels.workloads import make_workload

REPS = 5


def profiled(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()
    return prof


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=131072)
    args = ap.parse_args()
    q, k, v = make_workload(args.seq_len, device="cuda", dtype=torch.bfloat16, seed=0)
    scale = q.shape[-1] ** -0.5
    sel = PbsSettings(block_size=128, segment_size=256, threshold=0.9, scale=scale, backend="triton")

    def perm_select():
        kp, vp, pos, stats = permute_keys(q, k, v, block_size=128, segment_size=256, scale=scale, backend="triton",
                                          block_stats=True)
        select_blocks(q, kp, pos, sel, key_stats=stats)

    prof = profiled(perm_select)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))

    prof = profiled(lambda: pbs_attention(q, k, v, min_seq_len=0, backend="triton"))
    attend_us = rest_us = 0.0
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = e.self_cuda_time_total if t is None else t
        if "_attend_fwd_kernel" in e.key:
            attend_us += t
        else:
            rest_us += t
    total = (attend_us + rest_us) / REPS / 1e3
    print(f"pbs_attention at {args.seq_len} tokens, GPU kernel time per call: {total:.3f} ms = attend "
          f"{attend_us / REPS / 1e3:.3f} ms + permutation and selection {rest_us / REPS / 1e3:.3f} ms "
          f"({100 * rest_us / (attend_us + rest_us):.1f}%)")


if __name__ == "__main__":
    main()
