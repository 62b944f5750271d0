"""Where permutation and selection spend their time at 128K (torch.profiler, CUDA kernels).

    python scripts/gpu_profile_overhead.py [--seq-len 131072]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from pbs_kernels.ops.permute import permute_keys
from pbs_kernels.ops.select import select_blocks
from pbs_kernels.workloads import make_workload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=131072)
    args = ap.parse_args()
    q, k, v = make_workload(args.seq_len, device="cuda", dtype=torch.bfloat16, seed=0)
    scale = q.shape[-1] ** -0.5

    def run():
        kp, vp, pos = permute_keys(q, k, v, block_size=128, segment_size=256, scale=scale, backend="triton")
        select_blocks(q, kp, pos, block_size=128, segment_size=256, threshold=0.9, scale=scale, backend="triton")

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
