"""Serving shapes: chunks against a cached prefix (M < N), packed varlen batches, sliding windows,
learned sinks and soft-capping, against the plain-torch references on odd shapes."""
import pytest
import torch

from pbs_kernels.attention import PbsPrefixCache, pbs_attention, pbs_attention_varlen, pbs_plan
from pbs_kernels.ops.attend import attend_naive
from pbs_kernels.ops.attend.fwd import attend_triton
from pbs_kernels.ops.permute import permute_keys, score_keys_naive
from pbs_kernels.ops.permute.score import score_keys_triton
from pbs_kernels.ops.select import select_blocks_naive
from pbs_kernels.ops.select.fused import select_blocks_triton
from pbs_kernels.settings import PbsSettings

from _ref import dense_reference, masked_ref, max_err, rand_qkv, rel_err, token_mask

B16, S64 = 16, 64  # small tiles keep the interpreter's runs short


def _chunk(q, M):
    return q[:, :, q.shape[2] - M:].contiguous()


@pytest.mark.parametrize(
    "N,M,HQ,H",
    [
        pytest.param(1000, 300, 4, 2, id="N1000-M300-HQ4-H2"),
        pytest.param(1000, 1, 2, 1, id="N1000-M1-HQ2-H1"),
        pytest.param(517, 77, 8, 1, id="N517-M77-HQ8-H1"),
        pytest.param(300, 300, 2, 2, id="N300-M300-prefill"),
    ],
)
def test_chunk_threshold_one_equals_dense_torch(N, M, HQ, H):
    q, k, v = rand_qkv(2, HQ, H, N, 64)
    qc = _chunk(q, M)
    out, st = pbs_attention(qc, k, v, block_size=32, segment_size=64, threshold=1.0, backend="torch",
                            return_stats=True)
    ref = dense_reference(q, k, v)[:, :, N - M:]
    assert not st.dense and out.shape == qc.shape
    assert rel_err(out, ref) < 1e-5, f"rel {rel_err(out, ref):.2e} max {max_err(out, ref):.2e}"


@pytest.mark.parametrize("N,M", [pytest.param(600, 200, id="N600-M200"), pytest.param(433, 1, id="N433-M1")])
def test_chunk_threshold_one_equals_dense_triton(N, M):
    q, k, v = rand_qkv(1, 4, 2, N, 64)
    qc = _chunk(q, M)
    out = pbs_attention(qc, k, v, block_size=B16 * 2, segment_size=S64, threshold=1.0, backend="triton")
    ref = dense_reference(q, k, v)[:, :, N - M:]
    assert rel_err(out, ref) < 1e-4, f"rel {rel_err(out, ref):.2e} max {max_err(out, ref):.2e}"


def test_chunk_rows_equal_whole_prompt_rows_with_the_same_permutation():
    """A chunk's kept tiles are masked by original positions: with the same permutation and a
    sparse selection, its rows are exactly the kernel's rows for the whole prompt's queries."""
    N, M = 700, 250
    q, k, v = rand_qkv(1, 2, 1, N, 64)
    qc = _chunk(q, M)
    kp, vp, pos = permute_keys(qc, k, v, block_size=32, segment_size=64, scale=0.125)
    blocks = select_blocks_naive(qc, kp, pos, PbsSettings(block_size=32, segment_size=64, threshold=0.7, scale=0.125))
    assert blocks.q_block0 == (N - M) // 32 and blocks.num_blocks == -(-N // 32)
    ref = masked_ref(qc, kp, vp, token_mask(blocks, pos, N, M), 0.125)
    out = torch.full_like(qc, float("nan"))
    attend_triton(qc, kp, vp, pos, blocks, scale=0.125, out=out)
    assert not torch.isnan(out).any(), "some output rows were never written"
    assert rel_err(out, ref) < 1e-4
    assert rel_err(attend_naive(qc, kp, vp, pos, blocks, scale=0.125), ref) < 1e-5
    assert 0 < float(blocks.density_per_head().mean()) < 1


def test_select_triton_matches_naive_on_chunks_and_windows():
    N, M = 900, 333
    q, k, v = rand_qkv(2, 4, 2, N, 64)
    qc = _chunk(q, M)
    kp, vp, pos = permute_keys(qc, k, v, block_size=32, segment_size=64, scale=0.125)
    for window in (None, 150):
        for tau in (0.8, 1.0):
            s = PbsSettings(block_size=32, segment_size=64, threshold=tau, scale=0.125, window=window)
            want = select_blocks_naive(qc, kp, pos, s)
            got = select_blocks_triton(qc, kp, pos, s)
            assert got.q_block0 == want.q_block0
            assert torch.equal(got.n_off, want.n_off) and torch.equal(got.n_total, want.n_total)
            assert torch.equal(got.dense_mask(), want.dense_mask()), (window, tau)


def test_score_triton_matches_naive_on_a_chunk():
    q, k, _ = rand_qkv(1, 4, 2, 500, 64)
    qc = _chunk(q, 150)
    want = score_keys_naive(qc, k, block_size=32, scale=0.125)
    got = score_keys_triton(qc, k, block_size=32, scale=0.125)
    assert rel_err(got, want) < 1e-4
    # The chunk's last block is the whole prompt's last block: same scores.
    assert rel_err(score_keys_naive(q, k, block_size=32, scale=0.125), want) < 1e-6


@pytest.mark.parametrize("feature", ["window", "sinks", "softcap", "all"])
@pytest.mark.parametrize("M", [pytest.param(260, id="M260"), pytest.param(555, id="M555-prefill")])
def test_attend_features_triton_and_naive_match_dense(feature, M):
    N = 555
    q, k, v = rand_qkv(1, 4, 2, N, 64)
    qc = _chunk(q, M)
    kw = {}
    if feature in ("window", "all"):
        kw["window"] = 97
    if feature in ("sinks", "all"):
        kw["sinks"] = torch.randn(4) * 2
    if feature in ("softcap", "all"):
        kw["softcap"] = 4.0
    ref = dense_reference(qc, k, v, 0.125, **kw)
    for be in ("torch", "triton"):
        plan = pbs_plan(qc, k, v, block_size=32, segment_size=64, threshold=1.0, scale=0.125, backend=be, **kw)
        out = plan.attend(qc)
        assert not torch.isnan(out).any()
        assert rel_err(out, ref) < 1e-4, f"{be}: rel {rel_err(out, ref):.2e} max {max_err(out, ref):.2e}"
    if "window" in kw:
        # Tiles wholly outside the window are never kept: a 97-token window at N=555 keeps few.
        assert float(plan.density_per_head().mean()) < 0.5


def test_window_sparse_attend_uses_masked_straddling_tiles():
    N, M, W = 640, 640, 100
    q, k, v = rand_qkv(1, 2, 1, N, 64)
    kp, vp, pos = permute_keys(q, k, v, block_size=32, segment_size=64, scale=0.125)
    blocks = select_blocks_naive(q, kp, pos, PbsSettings(block_size=32, segment_size=64, threshold=0.6, scale=0.125,
                                                         window=W))
    ref = masked_ref(q, kp, vp, token_mask(blocks, pos, N, M, window=W), 0.125)
    out = torch.full_like(q, float("nan"))
    attend_triton(q, kp, vp, pos, blocks, scale=0.125, out=out, window=W)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-4


def test_prefix_cache_keeps_completed_segments_and_equals_dense():
    N, chunk = 800, 250
    q, k, v = rand_qkv(1, 4, 2, N, 64)
    ref = dense_reference(q, k, v)
    cache = PbsPrefixCache()
    outs = []
    for start in range(0, N, chunk):
        end = min(N, start + chunk)
        before = None if cache.pos is None else cache.pos.clone()
        out, st = pbs_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], block_size=32, segment_size=64,
                                threshold=1.0, backend="torch", return_stats=True, cache=cache)
        outs.append(out)
        assert not st.dense
        if before is not None:
            assert torch.equal(st.pos[:, :, :before.shape[-1]], before), "completed segments changed order"
        assert cache.n_done == (end // 64) * 64
    got = torch.cat(outs, dim=2)
    assert rel_err(got, ref) < 1e-5
    with pytest.raises(ValueError, match="chunk starts"):
        pbs_attention(q[:, :, :300], k[:, :, :300], v[:, :, :300], block_size=32, segment_size=64, cache=cache,
                      backend="torch")


def _pack(ts, lens):
    return torch.cat([t[0, :, :n].transpose(0, 1) for t, n in zip(ts, lens)], dim=0).contiguous()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_mixed_lengths_and_chunks_equal_dense(backend):
    HQ, H, D = 4, 2, 64
    kv_lens = [300, 50, 517, 129] if backend == "torch" else [300, 50, 400]
    q_lens = [300, 50, 100, 1] if backend == "torch" else [300, 50, 33]
    seqs = [rand_qkv(1, HQ, H, n, D) for n in kv_lens]
    q = torch.cat([s[0][0, :, n - m:].transpose(0, 1) for s, n, m in zip(seqs, kv_lens, q_lens)]).contiguous()
    k = _pack([s[1] for s in seqs], kv_lens)
    v = _pack([s[2] for s in seqs], kv_lens)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(kv_lens).cumsum(0)), dtype=torch.int32)
    out, stats = pbs_attention_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(kv_lens), block_size=32,
                                      segment_size=64, threshold=1.0, backend=backend, return_stats=True)
    assert [s.dense for s in stats] == [n <= 64 for n in kv_lens]
    for i, (s, n, m) in enumerate(zip(seqs, kv_lens, q_lens)):
        ref = dense_reference(s[0], s[1], s[2])[0, :, n - m:].transpose(0, 1)
        got = out[int(cu_q[i]):int(cu_q[i + 1])]
        assert rel_err(got, ref) < 1e-4, f"sequence {i}: rel {rel_err(got, ref):.2e}"


def test_padded_batch_unpads_to_varlen():
    """A right-padded batch, unpadded with its lengths, gives each row's dense answer."""
    lens = [400, 130, 260]
    q, k, v = rand_qkv(3, 2, 1, 400, 64)
    cu = torch.tensor([0, 400, 530, 790], dtype=torch.int32)
    out = pbs_attention_varlen(_pack([q[i:i + 1] for i in range(3)], lens), _pack([k[i:i + 1] for i in range(3)], lens),
                               _pack([v[i:i + 1] for i in range(3)], lens), cu, cu, 400, 400, block_size=32,
                               segment_size=64, threshold=1.0, backend="torch")
    for i, n in enumerate(lens):
        ref = dense_reference(q[i:i + 1, :, :n], k[i:i + 1, :, :n], v[i:i + 1, :, :n])[0].transpose(0, 1)
        assert rel_err(out[int(cu[i]):int(cu[i + 1])], ref) < 1e-5


def test_bad_serving_shapes_are_one_line_value_errors():
    q, k, v = rand_qkv(1, 2, 1, 100, 64)
    with pytest.raises(ValueError, match=r"q_len 100 > kv_len 50") as e:
        pbs_attention(q, k[:, :, :50], v[:, :, :50])
    assert "\n" not in str(e.value)
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    cases = [
        (torch.tensor([0, 60, 50, 100]), torch.tensor([0, 60, 50, 100]), "never decrease"),
        (torch.tensor([0, 50, 90]), torch.tensor([0, 50, 100]), "ends at 90"),
        (torch.tensor([0, 60, 100]), torch.tensor([0, 50, 100]), "queries must be the last M"),
        (torch.tensor([0, 100]), torch.tensor([0, 50, 100]), "sequences"),
    ]
    for cq, ck, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            pbs_attention_varlen(qp, kp, vp, cq, ck, 100, 100)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="max_seqlen"):
        pbs_attention_varlen(qp, kp, vp, torch.tensor([0, 100]), torch.tensor([0, 100]), 64, 100)
    with pytest.raises(ValueError, match="window"):
        pbs_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="sinks"):
        pbs_attention(q, k, v, sinks=torch.zeros(3))


@pytest.mark.gpu
@pytest.mark.parametrize("N,M", [(8192, 1000), (4097, 4097), (16384, 2048)])
def test_gpu_chunk_window_sinks_match_reference(N, M):
    q, k, v = rand_qkv(1, 8, 2, N, 128, torch.bfloat16, device="cuda")
    qc = _chunk(q, M)
    for kw in ({}, {"window": 1500}, {"sinks": torch.randn(8, device="cuda")}, {"softcap": 30.0}):
        out = pbs_attention(qc, k, v, threshold=1.0, backend="triton", **kw)
        ref = dense_reference(qc, k, v, **kw)
        assert rel_err(out, ref) < 2e-2, f"{kw}: rel {rel_err(out, ref):.2e}"
        out9, st = pbs_attention(qc, k, v, threshold=0.9, backend="triton", return_stats=True, **kw)
        assert not torch.isnan(out9).any() and st.density <= 1.0


@pytest.mark.gpu
def test_gpu_varlen_matches_reference():
    lens = [5000, 300, 9000, 129]
    seqs = [rand_qkv(1, 8, 2, n, 128, torch.bfloat16, device="cuda") for n in lens]
    q, k, v = (_pack([s[i] for s in seqs], lens) for i in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    out = pbs_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), threshold=1.0)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        ref = dense_reference(*s)[0].transpose(0, 1)
        assert rel_err(out[int(cu[i]):int(cu[i + 1])], ref) < 2e-2


def test_prefix_cache_triton_scores_only_the_suffix_like_the_reference():
    """The Triton path scores k[P:] as a strided view with the chunk's queries: the same order as
    the torch reference, and threshold 1.0 still equals dense attention."""
    from pbs_kernels.ops.permute import segment_order

    N, M, P = 480, 150, 256
    q, k, v = rand_qkv(1, 4, 2, N, 64)
    qc = _chunk(q, M)
    prefix = segment_order(q[:, :, :P], k[:, :, :P], block_size=32, segment_size=64, scale=0.125)
    want = segment_order(qc, k, block_size=32, segment_size=64, scale=0.125, prefix_pos=prefix)
    got = segment_order(qc, k, block_size=32, segment_size=64, scale=0.125, backend="triton", prefix_pos=prefix)
    assert torch.equal(got[:, :, :P], prefix) and torch.equal(got, want)
    cache = PbsPrefixCache(prefix, 64)
    out = pbs_attention(qc, k, v, block_size=32, segment_size=64, threshold=1.0, backend="triton", cache=cache)
    assert rel_err(out, dense_reference(qc, k, v)) < 1e-4
    assert cache.n_done == (N // 64) * 64


@pytest.mark.gpu
def test_gpu_prefix_cache_chunks_equal_dense():
    N, C = 20000, 6000
    q, k, v = rand_qkv(1, 8, 2, N, 128, torch.bfloat16, device="cuda")
    cache = PbsPrefixCache()
    outs = [pbs_attention(q[:, :, s:min(N, s + C)], k[:, :, :min(N, s + C)], v[:, :, :min(N, s + C)],
                          threshold=1.0, backend="triton", cache=cache) for s in range(0, N, C)]
    assert rel_err(torch.cat(outs, dim=2), dense_reference(q, k, v)) < 2e-2
