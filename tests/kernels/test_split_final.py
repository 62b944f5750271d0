"""The final rows shared among several programs (ops/attend/fwd.py, SPLIT): the same output and
LSE as one program per row, in every serving shape the plain kernel takes (chunks, two final
blocks, grouped heads, sinks, windows, soft-capping, vertical keys), and the auto rule's choice.
Triton interpreter, fp32: summation order only."""
import pytest
import torch

from pbs_kernels.attention import pbs_attention, pbs_plan
from pbs_kernels.ops.attend.fwd import SPLIT_TILES, attend_triton, final_splits
from pbs_kernels.ops.attend.naive import attend_naive

from _ref import dense_reference, max_err, rand_qkv

B16, S = 16, 64


@pytest.mark.parametrize("N,M,extra,split", [
    pytest.param(505, 505, {}, 2, id="T505-two-final-blocks"),
    pytest.param(512, 512, {}, 7, id="T512-one-final-block"),
    pytest.param(505, 200, {}, 3, id="chunk200"),
    pytest.param(505, 9, {}, 3, id="chunk-inside-one-block"),
    pytest.param(500, 500, dict(window=150), 3, id="window"),
    pytest.param(500, 500, dict(softcap=20.0), 3, id="softcap"),
    pytest.param(500, 500, dict(vertical_keys=2, threshold_mass="head", estimator="top"), 3, id="vertical-keys"),
    pytest.param(500, 500, dict(sinks=True), 5, id="sinks"),
])
def test_split_final_rows_equal_one_program(N, M, extra, split):
    q, k, v = rand_qkv(2, 4, 2, N, 64, seed=N + M + split)
    qc = q[:, :, N - M:].contiguous()
    extra = dict(extra)
    if extra.pop("sinks", False):
        extra["sinks"] = torch.randn(4)
    plan = pbs_plan(qc, k, v, block_size=B16, segment_size=S, threshold=0.5, backend="torch", **extra)
    kw = dict(scale=plan.scale, window=plan.window, sinks=plan.sinks, softcap=plan.softcap,
              vertical_keys=plan.vertical_keys, segment_size=plan.segment_size, return_lse=True)
    args = (qc, plan.k, plan.v, plan.pos, plan.blocks)
    one, lse1 = attend_triton(*args, split=1, **kw)
    got, lse = attend_triton(*args, split=split, **kw)
    want, lse_ref = attend_naive(*args, **kw)
    assert max_err(got, one) < 1e-5 and max_err(lse, lse1) < 1e-4
    assert max_err(got, want) < 1e-4 and max_err(lse, lse_ref) < 1e-4


def test_split_with_more_programs_than_tiles():
    """Splits with no unmasked tile of their own (a short row, many splits) add nothing."""
    q, k, v = rand_qkv(1, 2, 1, 100, 64, seed=3)
    plan = pbs_plan(q, k, v, block_size=B16, segment_size=S, threshold=0.5, backend="torch")
    args = (q, plan.k, plan.v, plan.pos, plan.blocks)
    got = attend_triton(*args, scale=plan.scale, segment_size=S, split=16)
    assert max_err(got, attend_naive(*args, scale=plan.scale)) < 1e-4


def test_auto_split_threshold_one_equals_dense():
    """A length whose final rows split by the auto rule (more than SPLIT_TILES blocks), end to end."""
    N = 16 * SPLIT_TILES + 101
    assert final_splits(-(-N // B16), B16, None) == 2
    q, k, v = rand_qkv(1, 3, 1, N, 64, seed=5)
    out = pbs_attention(q, k, v, block_size=B16, segment_size=S, threshold=1.0, backend="triton")
    assert max_err(out, dense_reference(q, k, v)) < 1e-4


def test_final_splits_rule():
    assert final_splits(SPLIT_TILES, 128, None) == 1  # few tiles: one program
    assert final_splits(64, 128, None) == 2  # 8K at b = 128
    assert final_splits(256, 128, None) == 8  # 32K
    assert final_splits(1024, 128, None) == 32  # 128K
    assert final_splits(1024, 128, 4096) == 2  # a 4K window: 33 tiles
    assert final_splits(1024, 128, 8192) == 3  # 65 tiles in an 8K window


@pytest.mark.gpu
@pytest.mark.parametrize("D,HQ,H,N", [(64, 9, 3, 32768 - 77), (128, 8, 1, 16384), (256, 4, 1, 8192 + 5)])
def test_split_final_rows_on_gpu(D, HQ, H, N):
    """bf16 on the GPU (tensor descriptors where the device has them): the auto split equals one
    program per row, and threshold 1.0 still equals dense."""
    g = torch.Generator(device="cuda").manual_seed(N)
    q, k, v = (torch.randn(1, h, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (HQ, H, H))
    plan = pbs_plan(q, k, v, threshold=0.9)
    args = (q, plan.k, plan.v, plan.pos, plan.blocks)
    assert final_splits(plan.blocks.num_blocks, 128, None) > 1
    one, lse1 = attend_triton(*args, scale=plan.scale, split=1, return_lse=True)
    got, lse = attend_triton(*args, scale=plan.scale, return_lse=True)
    assert max_err(got.float(), one.float()) < 2e-2 and max_err(lse, lse1) < 1e-3
    out = pbs_attention(q, k, v, threshold=1.0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(HQ // H, 1),
                                                           v.repeat_interleave(HQ // H, 1), is_causal=True)
    assert max_err(out.float(), ref.float()) < 2e-2
