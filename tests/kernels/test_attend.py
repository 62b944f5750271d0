"""Attend (ops/attend): the sparse forward against token-mask references."""
import pytest
import torch

from pbs_kernels.ops.attend import attend_naive
from pbs_kernels.ops.attend.fwd import attend_triton
from pbs_kernels.ops.permute import permute_keys
from pbs_kernels.ops.select import select_blocks
from pbs_kernels.settings import PbsSettings

from _ref import masked_ref, max_err, rand_qkv, rel_err, token_mask


@pytest.mark.parametrize(
    "N,HQ,H,D,dtype,tol",
    [
        pytest.param(300, 4, 1, 64, torch.float32, 1e-4, id="T300-HQ4-H1-D64-fp32"),
        pytest.param(1000, 4, 2, 128, torch.float16, 1e-2, id="T1000-HQ4-H2-D128-fp16"),
        pytest.param(513, 8, 1, 64, torch.float16, 1e-2, id="T513-HQ8-H1-D64-fp16"),
    ],
)
@pytest.mark.parametrize("tau", [0.6, 0.9])
def test_attend_matches_token_mask_reference(N, HQ, H, D, dtype, tol, tau):
    q, k, v = rand_qkv(2, HQ, H, N, D, dtype)
    scale = D ** -0.5
    kp, vp, pos = permute_keys(q, k, v, block_size=64, segment_size=128, scale=scale)
    blocks = select_blocks(q, kp, pos, PbsSettings(block_size=64, segment_size=128, threshold=tau, scale=scale))
    ref = masked_ref(q, kp, vp, token_mask(blocks, pos, N), scale)
    out = torch.full_like(q, float("nan"))
    attend_triton(q, kp, vp, pos, blocks, scale=scale, out=out)
    out_tma = torch.full_like(q, float("nan"))
    attend_triton(q, kp, vp, pos, blocks, scale=scale, out=out_tma, use_tma=True)
    naive = attend_naive(q, kp, vp, pos, blocks, scale=scale)
    assert not torch.isnan(out).any(), "some output rows were never written"
    assert not torch.isnan(out_tma).any(), "some output rows were never written (tensor descriptors)"
    for got in (out, out_tma, naive):
        assert rel_err(got, ref) < tol, f"rel {rel_err(got, ref):.2e} max {max_err(got, ref):.2e}"


def test_attend_lse_gives_recall():
    q, k, v = rand_qkv(1, 2, 2, 400, 64)
    kp, vp, pos = permute_keys(q, k, v, block_size=32, segment_size=64, scale=0.125)
    full = select_blocks(q, kp, pos, PbsSettings(block_size=32, segment_size=64, threshold=1.0, scale=0.125))
    part = select_blocks(q, kp, pos, PbsSettings(block_size=32, segment_size=64, threshold=0.5, scale=0.125))
    _, lse_full = attend_triton(q, kp, vp, pos, full, scale=0.125, return_lse=True)
    _, lse_part = attend_triton(q, kp, vp, pos, part, scale=0.125, return_lse=True)
    recall = torch.exp(lse_part - lse_full)
    # Brute force: softmax mass of each query on its kept keys.
    s = (q.float() @ kp.float().transpose(-1, -2)) * 0.125
    allowed = token_mask(full, pos, 400)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    want = (p * token_mask(part, pos, 400)).sum(-1)
    assert torch.allclose(recall, want, atol=1e-4)
    assert (recall <= 1 + 1e-5).all() and recall.mean() < 1
