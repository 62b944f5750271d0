"""Head dims 80, 96 (padded to 128 inside the kernels) and 256 (Gemma): threshold 1.0 equals dense
causal attention on both backends, the Triton ops match their torch references at threshold < 1,
and chunks, packed batches, windows and soft-capping run at those dims too. Interpreter shapes
stay small: a D=256 tile is four times a D=64 one."""
import pytest
import torch

from pbs_kernels.attention import pbs_attention, pbs_attention_varlen, pbs_plan
from pbs_kernels.blocks import key_block_stats
from pbs_kernels.ops.attend import attend_naive
from pbs_kernels.ops.attend.fwd import attend_tiles, attend_triton
from pbs_kernels.ops.permute import permute_keys, score_keys_naive
from pbs_kernels.ops.permute.score import score_keys_triton
from pbs_kernels.ops.select import select_blocks_naive
from pbs_kernels.ops.select.fused import select_blocks_triton
from pbs_kernels.settings import PbsSettings

from _ref import dense_reference, max_err, rand_qkv, rel_err

ODD_DIMS = (80, 96, 256)


def _check(out, ref, tol, what=""):
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err, mx = rel_err(out, ref), max_err(out, ref)
    assert err < tol, f"{what}: rel rms err {err:.2e}, max err {mx:.2e}"


@pytest.mark.parametrize("D", ODD_DIMS)
@pytest.mark.parametrize("HQ,H", [(8, 2), (4, 1)], ids=["GQA4", "MQA"])
@pytest.mark.parametrize("N", [63, 517])
def test_threshold_one_equals_dense_torch(D, HQ, H, N):
    q, k, v = rand_qkv(1, HQ, H, N, D)
    out, st = pbs_attention(q, k, v, block_size=32, segment_size=64, threshold=1.0, backend="torch",
                            return_stats=True)
    assert st.dense == (N <= 64)
    _check(out, dense_reference(q, k, v), 1e-5, f"D{D}")


@pytest.mark.parametrize("D,N,HQ,H,dtype", [
    pytest.param(80, 301, 8, 2, torch.float16, id="D80-T301-GQA4-fp16"),
    pytest.param(96, 577, 4, 1, torch.float32, id="D96-T577-MQA-fp32"),
    pytest.param(256, 203, 4, 1, torch.float16, id="D256-T203-MQA-fp16"),
    pytest.param(256, 139, 8, 2, torch.float32, id="D256-T139-GQA4-fp32"),
])
def test_threshold_one_equals_dense_triton(D, N, HQ, H, dtype):
    q, k, v = rand_qkv(1, HQ, H, N, D, dtype)
    out, st = pbs_attention(q, k, v, block_size=32, segment_size=64, threshold=1.0, backend="triton",
                            return_stats=True)
    assert not st.dense and out.dtype == dtype
    _check(out, dense_reference(q, k, v), 1e-2 if dtype == torch.float16 else 1e-4, f"D{D}")


@pytest.mark.parametrize("D", ODD_DIMS)
def test_triton_ops_match_references_below_threshold_one(D):
    """Score, gather with pooling, selection and attend, each against its torch reference at a
    threshold that drops tiles (NaN-filled output: an unwritten element fails)."""
    N, HQ, H, b, S = 231, 4, 2, 32, 64
    q, k, v = rand_qkv(1, HQ, H, N, D)
    scale = D ** -0.5
    s_tri = score_keys_triton(q, k, block_size=b, scale=scale)
    s_ref = score_keys_naive(q, k, block_size=b, scale=scale)
    assert torch.allclose(s_tri, s_ref, rtol=1e-4, atol=1e-6), f"score max err {max_err(s_tri, s_ref):.2e}"

    k_p, v_p, pos, stats = permute_keys(q, k, v, block_size=b, segment_size=S, scale=scale, backend="triton",
                                        block_stats=True)
    k_r, v_r, pos_r = permute_keys(q, k, v, block_size=b, segment_size=S, scale=scale, backend="torch")
    assert torch.equal(pos, pos_r) and torch.equal(k_p, k_r) and torch.equal(v_p, v_r)
    ref_pool, ref_min = key_block_stats(k_r, pos_r, b)
    assert torch.allclose(stats[0], ref_pool, atol=1e-5) and torch.equal(stats[1], ref_min)

    blk = select_blocks_triton(q, k_p, pos, PbsSettings(block_size=b, segment_size=S, threshold=0.6, scale=scale),
                               key_stats=stats)
    ref_blk = select_blocks_naive(q, k_p, pos, PbsSettings(block_size=b, segment_size=S, threshold=0.6, scale=scale))
    assert torch.equal(blk.dense_mask(), ref_blk.dense_mask())
    assert float(blk.density_per_head().mean()) < 1.0  # the threshold dropped tiles

    out = torch.full_like(q, float("nan"))
    attend_triton(q, k_p, v_p, pos, blk, scale=scale, out=out)
    _check(out, attend_naive(q, k_p, v_p, pos, blk, scale=scale), 1e-5, f"attend D{D}")


@pytest.mark.parametrize("D,N,M", [pytest.param(80, 300, 77, id="D80-N300-M77"),
                                   pytest.param(256, 160, 33, id="D256-N160-M33")])
def test_chunk_threshold_one_equals_dense_triton(D, N, M):
    q, k, v = rand_qkv(1, 4, 1, N, D)
    qc = q[:, :, N - M:].contiguous()
    out = pbs_attention(qc, k, v, block_size=32, segment_size=64, threshold=1.0, backend="triton")
    _check(out, dense_reference(q, k, v)[:, :, N - M:], 1e-4, "chunk")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_batch_at_head_dim_96_equals_dense(backend):
    shapes = [(201, 201), (97, 30), (1, 1), (140, 140)]
    seqs = [rand_qkv(1, 4, 1, n, 96, seed=7 + i) for i, (n, _) in enumerate(shapes)]
    q = torch.cat([s[0][0, :, n - m:].transpose(0, 1) for s, (n, m) in zip(seqs, shapes)]).contiguous()
    k, v = (torch.cat([s[j][0].transpose(0, 1) for s in seqs]).contiguous() for j in (1, 2))
    cu_q = torch.tensor([0] + [m for _, m in shapes]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + [n for n, _ in shapes]).cumsum(0).to(torch.int32)
    out = pbs_attention_varlen(q, k, v, cu_q, cu_k, max(m for _, m in shapes), max(n for n, _ in shapes),
                               block_size=32, segment_size=64, threshold=1.0, backend=backend, packed=True)
    for i, ((n, m), s) in enumerate(zip(shapes, seqs)):
        ref = dense_reference(*s)[0, :, n - m:].transpose(0, 1)
        _check(out[int(cu_q[i]):int(cu_q[i + 1])], ref, 1e-4, f"sequence {i}")


def test_gemma_features_at_head_dim_256():
    """Gemma 2's layer as the model runs it: a sliding window and soft-capping, its own scale."""
    N, M = 203, 150
    q, k, v = rand_qkv(1, 4, 2, N, 256)
    qc = q[:, :, N - M:].contiguous()
    kw = dict(window=70, softcap=5.0)
    ref = dense_reference(qc, k, v, 0.0625, **kw)
    for be in ("torch", "triton"):
        plan = pbs_plan(qc, k, v, block_size=32, segment_size=64, threshold=1.0, scale=0.0625, backend=be, **kw)
        _check(plan.attend(qc), ref, 1e-4, be)


def test_tiles_fit_hopper_at_256():
    """The launch heuristic narrows the key tile at 256 so K, V (two stages) and Q fit in shared
    memory (227 KiB on Hopper); 80/96 run as 128."""
    for wide, elem in ((True, 2), (False, 4)):
        block_n, warps, stages = attend_tiles(128, 256, wide=wide, use_tma=True, cuda=True)
        smem = stages * 2 * block_n * 256 * elem + 128 * 256 * elem
        assert smem <= 227 * 1024, (wide, block_n, stages, smem)
        assert warps == 8
    assert attend_tiles(128, 128, wide=True, use_tma=False, cuda=True) == (128, 8, 3)


def test_unsupported_head_dim_is_a_one_line_error():
    q, k, v = rand_qkv(1, 2, 1, 100, 112)
    with pytest.raises(ValueError, match=r"head dim 112 .*\(64, 80, 96, 128, 256\)") as e:
        pbs_attention(q, k, v)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("D", [80, 96])
def test_padded_descriptor_box_reads_zeros_past_the_head_dim(D):
    """The tensor-descriptor path at 80 / 96 (not the default) runs: a [1, BLOCK_N, 128] box over
    rows of D elements, the columns past D from the descriptor's zero fill (Q's padding is zero
    too, so only a non-finite fill could leak into the scores; V's padding columns are never
    stored). The interpreter models the descriptor; scripts/gpu_head_dims.py checks the hardware."""
    q, k, v = rand_qkv(1, 4, 2, 300, D, torch.float16, seed=D)
    plan = pbs_plan(q, k, v, block_size=32, segment_size=64, threshold=0.7, backend="torch")
    ref = attend_naive(q.float(), plan.k.float(), plan.v.float(), plan.pos, plan.blocks, scale=plan.scale)
    out = torch.full_like(q, float("nan"))
    attend_triton(q, plan.k.contiguous(), plan.v.contiguous(), plan.pos, plan.blocks, scale=plan.scale,
                  use_tma=True, out=out)
    _check(out, ref, 1e-3, f"descriptor D{D}")


def test_vertical_keys_at_head_dim_80_match_torch():
    """The vertical-key loop's loads are masked to the head dim too (both of its K/V layouts)."""
    q, k, v = rand_qkv(1, 4, 1, 333, 80, seed=5)
    kw = dict(block_size=32, segment_size=64, threshold=0.5, vertical_keys=2)
    ref, st = pbs_attention(q, k, v, backend="torch", return_stats=True, **kw)
    assert st.density < 1.0
    plan = pbs_plan(q, k, v, backend="torch", **kw)
    for compact in (True, False):
        out = torch.full_like(q, float("nan"))
        attend_triton(q, plan.k, plan.v, plan.pos, plan.blocks, scale=plan.scale, out=out, vertical_keys=2,
                      segment_size=64, vertical_compact=compact)
        _check(out, ref, 1e-5, f"vertical compact={compact}")
