"""Permutation and selection variants on the lent GPU: correctness of the Triton score and gather
kernels on fresh data, then timings at 128K (medians of do_bench), then what TF32 pooled scores
would change in the selection.

    python scripts/gpu_permute_variants.py [--baseline FILE]

--baseline: a score.py from an earlier commit (e.g. `git show REV:kernels/pbs_kernels/ops/permute/score.py`)
to time next to the current kernel in the same process.
"""
import argparse
import importlib.util
import itertools

import torch
import triton
from triton.testing import do_bench

from pbs_kernels.metrics import output_error
from pbs_kernels.ops.attend import attend
from pbs_kernels.ops.permute import gather_keys, permute_keys, score_keys_naive, sort_within_segments
from pbs_kernels.ops.permute.gather import gather_keys_triton
from pbs_kernels.ops.permute.order import segment_order_triton
from pbs_kernels.ops.permute.score import score_keys_per_head, score_keys_triton
from pbs_kernels.ops.select import fused as select_fused
from pbs_kernels.ops.select import select_blocks
from pbs_kernels.settings import PbsSettings
from pbs_kernels.workloads import make_workload


def bench(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("pbs_kernels.ops.permute._score_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.score_keys_triton


VARIANTS = [dict(block_n=bn, num_warps=w, num_stages=s) for bn, w, s in
            ((64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 3))]


def check_and_time_permute(baseline):
    B, HQ, H, D, b = 1, 32, 8, 128, 128
    scale = D ** -0.5
    for N in (8191, 131072):
        q = torch.randn(B, HQ, N, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        if N < 20000:
            ref = score_keys_naive(q, k, block_size=b, scale=scale)
            for kw in VARIANTS + [dict(tiles_per_chunk=1), dict(tiles_per_chunk=7)]:
                got = score_keys_triton(q, k, block_size=b, scale=scale, **kw)
                err = ((got - ref).norm() / ref.norm()).item()
                print(f"check score {kw}: rel {err:.1e}")
                assert err < 1e-3, kw
            order = sort_within_segments(ref, 256)
            kt, vt = gather_keys_triton(k, v, order)
            kr, vr = gather_keys(k, v, order)
            assert torch.equal(kt, kr) and torch.equal(vt, vr)
            print("check gather: equal")
            continue
        flop = 2 * 2 * B * HQ * b * N * D  # two passes, one QK^T product each
        if baseline is not None:
            ms = bench(lambda: baseline(q, k, block_size=b, scale=scale))
            print(f"N={N} score baseline (first version): {ms:.3f} ms  {flop / ms / 1e9:.0f} TFLOP/s")
        for kw in VARIANTS:
            ms = bench(lambda: score_keys_triton(q, k, block_size=b, scale=scale, **kw))
            print(f"N={N} score {kw}: {ms:.3f} ms  {flop / ms / 1e9:.0f} TFLOP/s")
        for per in (4, 8, 16, 32, 64):
            ms = bench(lambda: score_keys_triton(q, k, block_size=b, scale=scale, tiles_per_chunk=per))
            print(f"N={N} score default, {per} tiles per chunk: {ms:.3f} ms")
        per_head = score_keys_per_head(q, k, block_size=b, scale=scale)

        def torch_order():
            return sort_within_segments(per_head.view(B, H, HQ // H, N).sum(2), 256).to(torch.int32)

        order = segment_order_triton(per_head, B, H, N, 256)
        assert (order == torch_order()).float().mean() > 0.999
        print(f"N={N} segment order, torch group sum + sort + int32: {bench(torch_order):.3f} ms")
        print(f"N={N} segment order, Triton kernel: {bench(lambda: segment_order_triton(per_head, B, H, N, 256)):.3f} ms")
        print(f"N={N} gather triton: {bench(lambda: gather_keys_triton(k, v, order)):.3f} ms")
        print(f"N={N} gather triton + key-block pooling: "
              f"{bench(lambda: gather_keys_triton(k, v, order, pool_block=b)):.3f} ms")
        ms = bench(lambda: permute_keys(q, k, v, block_size=b, segment_size=256, scale=scale, backend="triton",
                                        block_stats=True))
        print(f"N={N} permute_keys (score + order + pooling gather): {ms:.3f} ms")


def _fp32_scores(q_pool, k_pool):
    return torch.matmul(q_pool, k_pool.transpose(-1, -2))


def tf32_selection(N=131072):
    """Pooled block scores in TF32 (the default) against fp32: time, and how the selection and
    the output move; with and without the gather's key-block statistics."""
    q, k, v = make_workload(N, device="cuda", dtype=torch.bfloat16, seed=0)
    scale = q.shape[-1] ** -0.5
    kp, vp, pos, stats = permute_keys(q, k, v, block_size=128, segment_size=256, scale=scale, backend="triton",
                                      block_stats=True)
    sel = PbsSettings(block_size=128, segment_size=256, threshold=0.9, scale=scale, backend="triton")
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    res = {}
    tf32_scores = select_fused.pooled_scores
    for tf32, key_stats in ((False, None), (True, None), (True, stats)):
        select_fused.pooled_scores = tf32_scores if tf32 else _fp32_scores
        ms = bench(lambda: select_blocks(q, kp, pos, sel, key_stats=key_stats))
        blocks = select_blocks(q, kp, pos, sel, key_stats=key_stats)
        out = attend(q, kp, vp, pos, blocks, scale=scale, backend="triton")
        dens = blocks.density_per_head().mean().item()
        res[tf32] = blocks
        print(f"N={N} select tf32={tf32} key_stats={key_stats is not None}: {ms:.3f} ms  density {dens:.4f}  "
              f"error vs cuDNN {output_error(out, ref):.4e}")
    select_fused.pooled_scores = tf32_scores
    a, b_ = res[False], res[True]
    same = (a.n_total == b_.n_total) & (a.n_off == b_.n_off)
    print(f"N={N} rows with the same kept-block counts fp32 vs tf32: {same.float().mean().item():.4f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None)
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    check_and_time_permute(load_baseline(args.baseline) if args.baseline else None)
    tf32_selection()


if __name__ == "__main__":
    main()
