"""Permutation variants on the lent GPU: correctness of the Triton gather and score kernels on
fresh data, then timings at 128K (medians of do_bench).

    python scripts/gpu_permute_dev.py
"""
import itertools

import torch
import triton
from triton.testing import do_bench

from pbs_kernels.ops.permute import gather_keys, score_keys_naive, sort_within_segments
from pbs_kernels.ops.permute.gather import gather_keys_triton
from pbs_kernels.ops.permute.score import score_keys_triton


def main():
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    B, HQ, H, D, b = 1, 32, 8, 128, 128
    for N in (8191, 131072):
        q = torch.randn(B, HQ, N, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        scale = D ** -0.5
        if N < 20000:
            ref = score_keys_naive(q, k, block_size=b, scale=scale)
            for bn, w in itertools.product((64, 128), (4, 8)):
                got = score_keys_triton(q, k, block_size=b, scale=scale, block_n=bn, num_warps=w)
                err = ((got - ref).norm() / ref.norm()).item()
                print(f"check score bn={bn} w={w}: rel {err:.1e}")
                assert err < 1e-2
            order = sort_within_segments(ref, 256)
            kt, vt = gather_keys_triton(k, v, order)
            kr, vr = gather_keys(k, v, order)
            assert torch.equal(kt, kr) and torch.equal(vt, vr)
            print("check gather: equal")
            continue
        for bn, w in itertools.product((64, 128), (4, 8)):
            ms = do_bench(lambda: score_keys_triton(q, k, block_size=b, scale=scale, block_n=bn, num_warps=w),
                          warmup=25, rep=200, return_mode="median")
            print(f"N={N} score bn={bn} warps={w}: {ms:.3f} ms")
        order = sort_within_segments(score_keys_triton(q, k, block_size=b, scale=scale), 256)
        print(f"N={N} gather torch: {do_bench(lambda: gather_keys(k, v, order), warmup=25, rep=200, return_mode='median'):.3f} ms")
        for rows in (32, 64, 128):
            ms = do_bench(lambda: gather_keys_triton(k, v, order, block_rows=rows), warmup=25, rep=200,
                          return_mode="median")
            print(f"N={N} gather triton rows={rows}: {ms:.3f} ms")


if __name__ == "__main__":
    main()
