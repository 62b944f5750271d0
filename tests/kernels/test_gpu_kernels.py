"""GPU checks (bf16, up to 32K tokens); run on a CUDA machine with `make test-gpu`."""
import pytest
import torch

from pbs_kernels import pbs_attention
from pbs_kernels.attention import dense_causal_attention
from pbs_kernels.ops.attend.fwd import attend_triton
from pbs_kernels.ops.attend.naive import attend_naive
from pbs_kernels.ops.permute import permute_keys, score_keys_naive
from pbs_kernels.ops.permute.score import score_keys_triton
from pbs_kernels.blocks import BlockList
from pbs_kernels.ops.select import select_blocks
from pbs_kernels.settings import PbsSettings

from _ref import rel_err

pytestmark = pytest.mark.gpu


def _qkv(N, HQ=32, H=8, D=128, dtype=torch.bfloat16):
    q = torch.randn(1, HQ, N, D, device="cuda", dtype=dtype)
    k = torch.randn(1, H, N, D, device="cuda", dtype=dtype)
    v = torch.randn(1, H, N, D, device="cuda", dtype=dtype)
    k[:, :, torch.randint(0, N, (N // 50,), device="cuda")] *= 3
    return q, k, v


@pytest.mark.parametrize("N", [4097, 16384, 32768])
@pytest.mark.parametrize("D", [64, 128])
def test_threshold_one_equals_dense_bf16(N, D):
    q, k, v = _qkv(N, D=D)
    out = pbs_attention(q, k, v, threshold=1.0, backend="triton")
    ref = dense_causal_attention(q.float(), k.float(), v.float())
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("N", [8191, 16384])
def test_dense_fallback_with_grouped_heads_bf16(N):
    # The fallback hands cuDNN K/V with fewer heads than Q when a probe says it handles them.
    q, k, v = _qkv(N)
    out = dense_causal_attention(q, k, v)
    ref = dense_causal_attention(q.float(), k.float(), v.float())  # fp32: SDPA on copied K/V
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("N,b,S", [(8191, 128, 256), (32768, 128, 512), (20000, 64, 256)])
def test_sparse_matches_reference_bf16(N, b, S):
    q, k, v = _qkv(N)
    scale = 128 ** -0.5
    st = score_keys_triton(q, k, block_size=b, scale=scale)
    assert rel_err(st, score_keys_naive(q, k, block_size=b, scale=scale)) < 1e-2
    kp, vp, pos = permute_keys(q, k, v, block_size=b, segment_size=S, scale=scale, backend="triton")
    bl = select_blocks(q, kp, pos, PbsSettings(block_size=b, segment_size=S, threshold=0.9, scale=scale,
                                               backend="torch"))
    out = torch.full_like(q, float("nan"))
    attend_triton(q, kp, vp, pos, bl, scale=scale, out=out)
    assert not torch.isnan(out).any()
    heads = slice(0, 4)  # the reference is slow; the first KV group is enough
    sub = BlockList(bl.idx[:, heads].contiguous(), bl.n_off[:, heads].contiguous(),
                    bl.n_total[:, heads].contiguous(), b)
    ref = attend_naive(q[:, heads].float(), kp[:, :1].float(), vp[:, :1].float(), pos[:, :1], sub, scale=scale)
    assert rel_err(out[:, heads], ref) < 1e-2


@pytest.mark.parametrize("N,b,tau", [(32768, 128, 0.9), (30000, 64, 0.8)])
def test_select_triton_matches_torch_bf16(N, b, tau):
    q, k, v = _qkv(N)
    kp, vp, pos = permute_keys(q, k, v, block_size=b, segment_size=256, scale=128 ** -0.5, backend="triton")
    s = PbsSettings(block_size=b, segment_size=256, threshold=tau, scale=128 ** -0.5, backend="torch")
    want = select_blocks(q, kp, pos, s)
    got = select_blocks(q, kp, pos, s.replace(backend="triton"))
    # The Triton path's pooled GEMM runs in TF32 (the reference in fp32): borderline blocks may
    # flip, nothing more.
    diff = (got.n_total - want.n_total).abs().float()
    assert (diff > 0).float().mean() < 0.02 and diff.mean() < 0.05
    # Key-block statistics from the pooling gather select the same blocks as recomputing them.
    kp2, vp2, pos2, stats = permute_keys(q, k, v, block_size=b, segment_size=256, scale=128 ** -0.5,
                                         backend="triton", block_stats=True)
    assert torch.equal(pos2, pos) and torch.equal(kp2, kp) and torch.equal(vp2, vp)
    fused = select_blocks(q, kp, pos, s.replace(backend="triton"), key_stats=stats)
    assert (fused.n_total != got.n_total).float().mean() < 0.005
    assert (got.n_total - want.n_total).abs().max() <= 2


@pytest.mark.parametrize("use_tma", [False, True])
def test_attend_tma_and_pointer_paths_agree(use_tma):
    q, k, v = _qkv(9000)
    scale = 128 ** -0.5
    kp, vp, pos = permute_keys(q, k, v, block_size=128, segment_size=256, scale=scale, backend="triton")
    bl = select_blocks(q, kp, pos, PbsSettings(block_size=128, segment_size=256, threshold=0.9, scale=scale,
                                               backend="triton"))
    out = torch.full_like(q, float("nan"))
    attend_triton(q, kp, vp, pos, bl, scale=scale, out=out, use_tma=use_tma)
    ref = attend_triton(q.float(), kp.float(), vp.float(), pos, bl, scale=scale, use_tma=False)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-2
