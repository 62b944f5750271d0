"""The runtime's plan API (permute_stage / select_stage / pbs_plan) and what pbs_attention builds
on it: bf16 on the CPU interpreter, forward-only Triton outputs, density within [0, 1]."""
import pytest
import torch

from pbs_kernels import pbs_attention
from pbs_kernels.attention import pbs_plan, permute_stage, select_stage

from _ref import dense_ref, rand_qkv, rel_err


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_plan_attend_equals_pbs_attention(backend):
    q, k, v = rand_qkv(1, 4, 2, 333, 64)
    plan = pbs_plan(q, k, v, block_size=32, segment_size=64, threshold=0.8, backend=backend)
    out = torch.full_like(q, float("nan"))
    out.copy_(plan.attend(q))
    want, stats = pbs_attention(q, k, v, block_size=32, segment_size=64, threshold=0.8, backend=backend,
                                return_stats=True)
    assert torch.equal(out, want)
    assert torch.equal(plan.blocks.dense_mask(), stats.blocks.dense_mask())
    assert torch.equal(plan.pos, stats.pos)


def test_stages_compose_to_the_plan():
    q, k, v = rand_qkv(2, 4, 2, 300, 64)
    keys = permute_stage(q, k, v, block_size=32, segment_size=128)
    blocks = select_stage(q, keys, block_size=32, segment_size=128, threshold=0.7)
    plan = pbs_plan(q, k, v, block_size=32, segment_size=128, threshold=0.7)
    assert torch.equal(blocks.dense_mask(), plan.blocks.dense_mask())
    assert torch.equal(keys.k, plan.k) and torch.equal(keys.pos, plan.pos)
    plain = permute_stage(q, k, v, block_size=32, segment_size=128, permute=False)
    assert torch.equal(plain.pos, torch.arange(300, dtype=torch.int32).expand(2, 2, 300))
    assert plain.k is k and not plain.permuted


@pytest.mark.parametrize("threshold", [1.0, 0.8])
def test_bf16_on_the_triton_interpreter_is_right(threshold):
    # The interpreter's bf16 tl.dot is wrong (relative error ~1e9 before the fix): the runtime
    # computes in fp32 there and returns bf16.
    q, k, v = rand_qkv(1, 4, 2, 400, 64, torch.bfloat16)
    got = pbs_attention(q, k, v, block_size=64, segment_size=128, threshold=threshold, backend="triton")
    ref_backend = pbs_attention(q, k, v, block_size=64, segment_size=128, threshold=threshold, backend="torch")
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_err(got, ref_backend) < 2e-2
    if threshold == 1.0:
        assert rel_err(got, dense_ref(q, k, v)) < 2e-2


def test_triton_output_refuses_backward_torch_is_differentiable():
    q, k, v = rand_qkv(1, 2, 2, 300, 64)
    q.requires_grad_(True)
    out = pbs_attention(q, k, v, block_size=64, segment_size=128, threshold=0.9, backend="triton")
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()
    q.grad = None
    out = pbs_attention(q, k, v, block_size=64, segment_size=128, threshold=0.9, backend="torch")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_density_is_at_most_one_and_extra_tiles_are_reported_apart():
    # With permutation an early key can sit behind the diagonal block of its segment; that tile
    # is computed too. It used to be counted into density (1.11-1.17 at threshold 1.0).
    q, k, v = rand_qkv(1, 4, 2, 1000, 64)
    _, st = pbs_attention(q, k, v, block_size=32, segment_size=256, threshold=1.0, backend="torch",
                          return_stats=True)
    assert st.density == pytest.approx(1.0)
    assert float(st.density_per_head.max()) <= 1.0
    assert st.extra_density > 0.0
    tiles = st.blocks.tiles_per_head().float().mean()
    assert float(tiles) / st.blocks.causal_tiles == pytest.approx(st.density + st.extra_density, rel=1e-5)
    _, st_np = pbs_attention(q, k, v, block_size=32, segment_size=256, threshold=1.0, permute=False,
                             backend="torch", return_stats=True)
    assert st_np.density == pytest.approx(1.0) and st_np.extra_density == 0.0
