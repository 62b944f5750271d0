"""Vertical keys (`vertical_keys`): each earlier segment's top slots, attended exactly where the
query block dropped the segment's first block. Checked against a token mask built here from the
kept tiles alone, so the kernel, the torch reference and `BlockList.vertical_segments` are each
compared with an independent statement of the rule."""
import pytest
import torch

from pbs_kernels import pbs_attention
from pbs_kernels.attention import pbs_plan
from pbs_kernels.ops.attend import attend_naive
from pbs_kernels.ops.attend.fwd import attend_triton
from pbs_kernels.workloads import make_vertical_slash

from _ref import dense_ref, masked_ref, rand_qkv, rel_err, token_mask


def vertical_token_mask(blocks, pos, N, M, segment_size, n, window=None):
    """[B, HQ, M, N] bool: slot g * segment_size + r (r < n) for every query whose segment is after
    g and whose block kept no tile of g's first block; causal and windowed by original position."""
    b = blocks.block_size
    kept = blocks.dense_mask()  # [B, HQ, NQB, NB]
    B, HQ = kept.shape[:2]
    G = HQ // pos.shape[1]
    out = torch.zeros(B, HQ, M, N, dtype=torch.bool)
    kpos = pos.long().repeat_interleave(G, 1)
    for row, p in enumerate(range(N - M, N)):
        li = p // b - blocks.q_block0
        for g in range(p // segment_size):
            first_block = g * segment_size // b
            for r in range(n):
                slot = g * segment_size + r
                if slot >= N:
                    continue
                ok = ~kept[:, :, li, first_block] & (kpos[:, :, slot] <= p)
                if window is not None:
                    ok &= kpos[:, :, slot] > p - window
                out[:, :, row, slot] = ok
    return out


@pytest.mark.parametrize(
    "N,M,HQ,H,D,dtype,n,window,tol",
    [
        pytest.param(700, 700, 4, 2, 64, torch.float32, 2, None, 1e-4, id="T700-fp32-n2"),
        pytest.param(611, 250, 4, 1, 64, torch.float32, 3, None, 1e-4, id="chunk250of611-n3"),
        pytest.param(650, 650, 4, 2, 128, torch.float16, 1, 300, 1e-2, id="T650-fp16-n1-window300"),
    ],
)
def test_vertical_keys_match_token_mask(N, M, HQ, H, D, dtype, n, window, tol):
    b, S = 32, 64
    q, k, v = rand_qkv(1, HQ, H, N, D, dtype)
    q = q[:, :, N - M:].contiguous()
    plan = pbs_plan(q, k, v, block_size=b, segment_size=S, threshold=0.5, backend="torch", window=window,
                    vertical_keys=n)
    extra = vertical_token_mask(plan.blocks, plan.pos, N, M, S, n, window)
    assert extra.any(), "the case exercises no vertical key"
    mask = token_mask(plan.blocks, plan.pos, N, M, window=window)
    assert not (mask & extra).any(), "a vertical key is also in a kept tile"
    ref = masked_ref(q, plan.k, plan.v, mask | extra, plan.scale)
    kw = dict(scale=plan.scale, window=window, vertical_keys=n, segment_size=S)
    naive = attend_naive(q, plan.k, plan.v, plan.pos, plan.blocks, **kw)
    outs = []
    for compact in (True, False):  # the slots gathered contiguous first, or read in place
        out = torch.full_like(q, float("nan"))
        attend_triton(q, plan.k, plan.v, plan.pos, plan.blocks, out=out, vertical_compact=compact, **kw)
        assert not torch.isnan(out).any(), "some output rows were never written"
        outs.append(out)
    for got in (naive, *outs):
        assert rel_err(got, ref) < tol, f"rel {rel_err(got, ref):.2e}"
    without = attend_naive(q, plan.k, plan.v, plan.pos, plan.blocks, scale=plan.scale, window=window)
    assert rel_err(without, ref) > 10 * tol, "the vertical keys changed nothing"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vertical_keys_at_threshold_one_is_dense(backend):
    q, k, v = rand_qkv(1, 4, 2, 523, 64)
    out = pbs_attention(q, k, v, block_size=32, segment_size=64, threshold=1.0, backend=backend, vertical_keys=4)
    assert rel_err(out, dense_ref(q, k, v)) < 1e-4


def test_vertical_keys_recover_scattered_keys():
    # One strong key per 128 tokens that every later query needs: mean-pooled selection misses
    # most of them at tau 0.7; their segments' top slots bring them back.
    q, k, v = make_vertical_slash(1024, heads=4, kv_heads=2, head_dim=64, dtype=torch.float32, seed=3,
                                  vertical_every=128)
    ref = dense_ref(q, k, v)
    kw = dict(block_size=32, segment_size=128, threshold=0.7, backend="torch", return_stats=True)
    off, st_off = pbs_attention(q, k, v, **kw)
    on, st_on = pbs_attention(q, k, v, vertical_keys=2, **kw)
    assert st_on.density == st_off.density  # same tiles; the keys come on top
    assert 0 < st_on.vertical_density < 2 / 128
    assert rel_err(on, ref) < 0.5 * rel_err(off, ref), (rel_err(on, ref), rel_err(off, ref))


@pytest.mark.parametrize("bad", [-1, 33, 1.5, True])
def test_vertical_keys_bad_value(bad):
    q, k, v = rand_qkv(1, 2, 2, 300, 64)
    with pytest.raises(ValueError, match="vertical_keys"):
        pbs_attention(q, k, v, block_size=32, segment_size=64, vertical_keys=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compact", [True, False])
def test_vertical_keys_on_the_gpu_bf16(compact):
    N, M = 5003, 3001
    q, k, v = rand_qkv(1, 8, 2, N, 128, torch.bfloat16, device="cuda")
    q = q[:, :, N - M:].contiguous()
    plan = pbs_plan(q, k, v, threshold=0.6, backend="triton", vertical_keys=4, window=2500)
    assert plan.vertical_density() > 0
    want = attend_naive(q.float(), plan.k.float(), plan.v.float(), plan.pos, plan.blocks, scale=plan.scale,
                        window=2500, vertical_keys=4, segment_size=plan.segment_size)
    got = attend_triton(q, plan.k, plan.v, plan.pos, plan.blocks, scale=plan.scale, window=2500, vertical_keys=4,
                        segment_size=plan.segment_size, vertical_compact=compact)
    assert rel_err(got, want) < 1e-2
