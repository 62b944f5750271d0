"""Packed varlen batches in one launch per op (`pbs_kernels.packing`): threshold 1.0 equals
dense causal attention per sequence, and at threshold < 1 every sequence gets what
pbs_attention on it alone gives (same permutation, same kept tiles, same output)."""
import pytest
import torch

from pbs_kernels.attention import _varlen_per_sequence, pbs_attention_varlen
from pbs_kernels.packing import build_layout
from pbs_kernels.settings import PbsSettings

from _ref import dense_reference, rand_qkv, rel_err

HQ, H = 4, 2


def _batch(shapes, D=64, seed=0, heads=(HQ, H), dtype=torch.float32, device="cpu"):
    """shapes: (N, M) per sequence -> packed q, k, v, cu_q, cu_k and the per-sequence tensors."""
    seqs = [rand_qkv(1, *heads, n, D, dtype=dtype, device=device, seed=seed + i) for i, (n, _) in enumerate(shapes)]
    q = torch.cat([s[0][0, :, n - m:].transpose(0, 1) for s, (n, m) in zip(seqs, shapes)]).contiguous()
    k, v = (torch.cat([s[j][0].transpose(0, 1) for s in seqs]).contiguous() for j in (1, 2))
    cu_q = torch.tensor([0] + [m for _, m in shapes], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    cu_k = torch.tensor([0] + [n for n, _ in shapes], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    return q, k, v, cu_q, cu_k, seqs


def _run(shapes, packed=True, seed=0, data=None, **kw):
    q, k, v, cu_q, cu_k, seqs = _batch(shapes, seed=seed, **(data or {}))
    mq, mk = max(m for _, m in shapes), max(n for n, _ in shapes)
    if packed:
        return pbs_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_stats=True, packed=True, **kw), cu_q, seqs
    call = {name: kw.pop(name) for name in ("sinks", "graph") if name in kw}
    return (_varlen_per_sequence(q, k, v, cu_q.tolist(), cu_k.tolist(), None, PbsSettings(**kw), return_stats=True,
                                 **call), cu_q, seqs)


# (N, M): lengths off the block (32) and segment (64) grid, one token, a chunk M < N whose first
# query block is partial, a short dense one, a sequence with no query, one with fewer queries
# than a block.
MIXED = [(300, 300), (1, 1), (517, 100), (50, 50), (200, 0), (129, 129), (97, 7), (256, 256), (192, 40)]
MIXED_SMALL = [(200, 200), (1, 1), (161, 45), (40, 40), (90, 0), (97, 9)]


@pytest.mark.parametrize("backend,shapes,min_len", [
    pytest.param("torch", MIXED, 0, id="torch-mixed"),
    pytest.param("torch", MIXED, 150, id="torch-mixed-min150"),
    pytest.param("triton", MIXED_SMALL, 0, id="triton-mixed"),
    pytest.param("triton", MIXED_SMALL, 150, id="triton-mixed-min150"),
])
def test_packed_threshold_one_equals_dense_per_sequence(backend, shapes, min_len):
    (out, stats), cu_q, seqs = _run(shapes, block_size=32, segment_size=64, threshold=1.0, backend=backend,
                                    min_seq_len=min_len)
    assert out.shape[0] == sum(m for _, m in shapes)
    for i, ((n, m), s) in enumerate(zip(shapes, seqs)):
        if m == 0:
            assert stats[i] is None
            continue
        assert stats[i].dense == (n <= 64 or n < min_len), f"sequence {i}"
        ref = dense_reference(*s)[0, :, n - m:].transpose(0, 1)
        got = out[int(cu_q[i]):int(cu_q[i + 1])]
        assert rel_err(got, ref) < 1e-5, f"sequence {i}: rel {rel_err(got, ref):.2e}"


def _same_as_per_sequence(shapes, tol=1e-5, **kw):
    (out, stats), cu_q, _ = _run(shapes, **kw)
    (ref, ref_stats), _, _ = _run(shapes, packed=False, **kw)
    assert len(stats) == len(ref_stats)
    for i, (st, rs) in enumerate(zip(stats, ref_stats)):
        if rs is None:
            assert st is None
            continue
        assert st.dense == rs.dense, f"sequence {i}"
        if not rs.dense:
            assert torch.equal(st.pos, rs.pos), f"sequence {i}: permutation differs"
            assert torch.equal(st.blocks.dense_mask(), rs.blocks.dense_mask()), f"sequence {i}: kept tiles differ"
            assert torch.equal(st.blocks.n_off, rs.blocks.n_off), f"sequence {i}: unmasked tiles differ"
            assert st.density == pytest.approx(rs.density) and st.extra_density == pytest.approx(rs.extra_density)
        a, b = out[int(cu_q[i]):int(cu_q[i + 1])], ref[int(cu_q[i]):int(cu_q[i + 1])]
        assert rel_err(a, b) < tol, f"sequence {i}: rel {rel_err(a, b):.2e}"
    # the comparison is about a sparse selection
    assert any(rs is not None and rs.density < 1.0 for rs in ref_stats)


@pytest.mark.parametrize("knobs", [
    pytest.param({}, id="default"),
    pytest.param({"window": 150}, id="window"),
    pytest.param({"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])}, id="sinks"),
    pytest.param({"softcap": 5.0}, id="softcap"),
    pytest.param({"estimator": "top"}, id="top"),
    pytest.param({"threshold_mass": "total", "threshold": 0.8}, id="total"),
    pytest.param({"estimator": "top", "threshold_mass": "total", "threshold": 0.5}, id="top-total"),
    # cut per sequence, not per batch; at 0.5 (0.8 before the final rows kept every tile, which left
    # these short sequences no sparse row)
    pytest.param({"threshold_mass": "head", "threshold": 0.5}, id="head"),
    pytest.param({"permute": False}, id="no-permute"),
    pytest.param({"min_seq_len": 300}, id="min300"),
])
def test_packed_torch_equals_per_sequence(knobs):
    kw = dict(block_size=32, segment_size=64, threshold=0.6, backend="torch")
    kw.update(knobs)
    _same_as_per_sequence(MIXED, **kw)


@pytest.mark.parametrize("heads,D", [pytest.param((8, 1), 128, id="HQ8-H1-D128"),
                                     pytest.param((2, 2), 64, id="HQ2-H2-D64")])
def test_packed_torch_equals_per_sequence_head_ratios(heads, D):
    _same_as_per_sequence(MIXED[:4], block_size=16, segment_size=32, threshold=0.6, backend="torch",
                          data=dict(heads=heads, D=D))


@pytest.mark.parametrize("knobs", [
    pytest.param({}, id="default"),
    pytest.param({"window": 100, "sinks": torch.tensor([0.5, -1.0, 2.0, 0.0]), "softcap": 5.0}, id="window-sinks-cap"),
    pytest.param({"estimator": "top", "threshold_mass": "total", "threshold": 0.5}, id="top-total"),
])
def test_packed_triton_equals_per_sequence(knobs):
    kw = dict(block_size=32, segment_size=64, threshold=0.6, backend="triton")
    kw.update(knobs)
    _same_as_per_sequence(MIXED_SMALL, **kw)


def test_layout_places_sequences_on_segment_boundaries():
    lay = build_layout([0, 10, 10, 60], [0, 100, 130, 330], block_size=32, segment_size=64, min_seq_len=0,
                       permute=True, heads=4, device="cpu")
    assert [s.index for s in lay.seqs] == [0, 2]  # the one with no query is not placed
    assert [s.offset for s in lay.seqs] == [0, 128] and lay.n_virtual == 128 + 256
    assert [s.dense for s in lay.seqs] == [False, False]
    assert lay.seg_sort.tolist() == [1, 0, 1, 1, 1, 0]  # full segments of sparse sequences only


def test_large_batches_are_cut_into_packed_groups(monkeypatch):
    import pbs_kernels.packing as packing

    bq, bk = [0, 10, 10, 60, 70], [0, 100, 130, 330, 400]
    kw = dict(block_size=32, segment_size=64, heads=4)
    assert packing.packed_groups(bq, bk, **kw) == [(0, 4)]
    # 4 B x 4 heads x 2 tables x 8^2 blocks: 8 blocks per group (256 tokens)
    monkeypatch.setattr(packing, "PACKED_TABLE_BYTES", 4 * 4 * 2 * 8 * 8)
    # blocks per sequence: 4, 0 (no query), 8, 2
    assert packing.packed_groups(bq, bk, **kw) == [(0, 2), (2, 3), (3, 4)]
    monkeypatch.setattr(packing, "PACKED_TABLE_BYTES", 4 * 4 * 2 * 24 * 24)
    _, _, _, cu_q, cu_k, _ = _batch(MIXED)
    assert len(packing.packed_groups(cu_q.tolist(), cu_k.tolist(), **kw)) == 3
    _same_as_per_sequence(MIXED, block_size=32, segment_size=64, threshold=0.6, backend="torch")


def test_packed_triton_bf16_threshold_one_equals_dense():
    shapes = [(200, 200), (97, 30), (40, 40)]
    (out, _), cu_q, seqs = _run(shapes, data=dict(dtype=torch.bfloat16), block_size=32, segment_size=64,
                                threshold=1.0, backend="triton")
    assert out.dtype == torch.bfloat16
    for i, ((n, m), s) in enumerate(zip(shapes, seqs)):
        ref = dense_reference(*s)[0, :, n - m:].transpose(0, 1)
        assert rel_err(out[int(cu_q[i]):int(cu_q[i + 1])], ref) < 1e-2


def test_packed_batch_bad_inputs_stay_one_line_errors():
    q, k, v, cu_q, cu_k, _ = _batch([(100, 100), (70, 70)])
    with pytest.raises(ValueError, match="block_size") as e:
        pbs_attention_varlen(q, k, v, cu_q, cu_k, 100, 100, block_size=48)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="sinks"):
        pbs_attention_varlen(q, k, v, cu_q, cu_k, 100, 100, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="head dim"):
        pbs_attention_varlen(q[..., :32], k[..., :32], v[..., :32], cu_q, cu_k, 100, 100)


@pytest.mark.gpu
def test_gpu_packed_equals_per_sequence_and_dense():
    shapes = [(5000, 5000), (1, 1), (9000, 1000), (300, 300), (2000, 0), (4097, 4097), (700, 77)]
    data = dict(heads=(8, 2), D=128, dtype=torch.bfloat16, device="cuda")
    (out, _), cu_q, seqs = _run(shapes, data=data, threshold=1.0)
    for i, ((n, m), s) in enumerate(zip(shapes, seqs)):
        if m:
            ref = dense_reference(*s)[0, :, n - m:].transpose(0, 1)
            got = out[int(cu_q[i]):int(cu_q[i + 1])]
            assert rel_err(got, ref) < 2e-2, f"sequence {i}: rel {rel_err(got, ref):.2e}"
    # bf16 outputs and TF32 pooled scores: the same tiles up to near-ties, outputs within bf16
    (out, st), _, _ = _run(shapes, data=data, threshold=0.9)
    (ref, rs), _, _ = _run(shapes, packed=False, data=data, threshold=0.9)
    rows = [(a.blocks.dense_mask().flatten(0, 2) == b.blocks.dense_mask().flatten(0, 2)).all(-1)
            for a, b in zip(st, rs) if b is not None and not b.dense]
    same = torch.cat(rows).float().mean().item()
    assert same > 0.99, f"only {same:.3f} of the rows keep the same tiles"
    assert rel_err(out, ref) < 2e-2
