"""Issue 22, the fixed cost of a call: cached checks, the measured sparse-or-dense choice
(`min_seq_len="auto"`, pbs_kernels.crossover), the old host path (LEGACY_HOST) against the new
one, and whole-call CUDA graphs (pbs_kernels.graphs; the captures themselves need a GPU)."""
import json

import pytest
import torch

from pbs_kernels import crossover, pbs_attention, pbs_attention_varlen
from pbs_kernels.attention import dense_causal_attention
from pbs_kernels.graphs import PbsGraphs, auto_worth_it, why_eager
from pbs_kernels import _host
from pbs_kernels.profile import LayerConfig, PbsProfile, ProfileError

from _ref import dense_ref, max_err, rand_qkv, rel_err

SMALL = dict(block_size=64, segment_size=128, threshold=0.5)


@pytest.fixture
def fake_timer(monkeypatch):
    """Replace the wall-clock timer: `costs[path]` seconds for the dense / sparse run, each call
    recorded, and no choice remembered from another test."""
    crossover.forget()
    calls = []
    costs = {}

    def timer(fn, device):
        fn()  # the path runs (as in the real timer), so a broken path still fails the test
        path = "dense" if len(calls) % 2 == 0 else "sparse"  # sparse_wins times dense first
        calls.append(path)
        return costs[path]

    monkeypatch.setattr(crossover, "time_call", timer)
    yield costs, calls
    crossover.forget()


@pytest.mark.parametrize("winner", ["dense", "sparse"])
def test_auto_min_seq_len_runs_the_measured_winner(fake_timer, winner):
    costs, calls = fake_timer
    costs.update(dense=1.0 if winner == "sparse" else 0.1, sparse=0.5)
    q, k, v = rand_qkv(1, 4, 2, 600, 64, seed=1)
    out, st = pbs_attention(q, k, v, min_seq_len="auto", return_stats=True, **SMALL)
    assert calls == ["dense", "sparse"]
    assert st.dense == (winner == "dense")
    want = pbs_attention(q, k, v, min_seq_len=10**9 if winner == "dense" else 0, **SMALL)
    assert torch.equal(out, want)
    if winner == "dense":
        assert torch.equal(out, dense_causal_attention(q, k, v, scale=64 ** -0.5))
    else:
        assert st.density < 1.0 and rel_err(out, dense_ref(q, k, v)) > 0.0


def test_auto_choice_is_kept_per_length_bucket(fake_timer):
    costs, calls = fake_timer
    costs.update(dense=1.0, sparse=0.5)
    q, k, v = rand_qkv(1, 4, 2, 600, 64, seed=2)
    pbs_attention(q, k, v, min_seq_len="auto", **SMALL)
    q2, k2, v2 = rand_qkv(1, 4, 2, 700, 64, seed=3)  # same bucket (1024): no new measurement
    _, st = pbs_attention(q2, k2, v2, min_seq_len="auto", return_stats=True, **SMALL)
    assert len(calls) == 2 and not st.dense
    costs.update(dense=0.1)  # a new bucket (2048) measures again and may choose otherwise
    q3, k3, v3 = rand_qkv(1, 4, 2, 1100, 64, seed=4)
    _, st = pbs_attention(q3, k3, v3, min_seq_len="auto", return_stats=True, **SMALL)
    assert len(calls) == 4 and st.dense
    pbs_attention(q, k, v, min_seq_len="auto", threshold=0.7, block_size=64, segment_size=128)
    assert len(calls) == 6  # other settings, other measurement


def test_auto_needs_a_margin_to_choose_sparse(fake_timer):
    costs, _ = fake_timer
    costs.update(dense=1.0, sparse=0.97)  # within the noise margin: dense is never risked
    q, k, v = rand_qkv(1, 2, 1, 600, 64, seed=5)
    _, st = pbs_attention(q, k, v, min_seq_len="auto", return_stats=True, **SMALL)
    assert st.dense and crossover.MARGIN < 0.97


def test_auto_choice_file_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("PBS_CACHE_DIR", str(tmp_path))
    crossover.forget()
    timed = []

    def timer(fn, device):
        timed.append(1)
        return 1.0 if len(timed) == 1 else 0.2

    key = ("gpu-name", "torch.bfloat16", 1, 9, 3, 64, 8192, True, "knobs")
    assert crossover.sparse_wins(key, None, None, torch.device("cpu"), timer=timer, use_file=True)
    rows = json.loads(crossover.cache_path().read_text())
    assert rows == [{"key": list(key), "sparse": True}]
    crossover.forget()
    crossover._FILE_LOADED.clear()  # a new process
    assert crossover.sparse_wins(key, None, None, torch.device("cpu"), timer=timer, use_file=True)
    assert len(timed) == 2  # read from the file, not measured again
    crossover.forget()


def test_length_bucket():
    assert [crossover.length_bucket(n) for n in (1, 257, 8192, 8193, 32768)] == [1, 512, 8192, 16384, 32768]


@pytest.mark.parametrize("bad", [-1, "fast", True])
def test_bad_min_seq_len(bad):
    q, k, v = rand_qkv(1, 2, 1, 300, 64)
    with pytest.raises(ValueError, match="min_seq_len"):
        pbs_attention(q, k, v, min_seq_len=bad)


def test_profile_min_seq_len_auto(tmp_path):
    assert LayerConfig(min_seq_len="auto").min_seq_len == "auto"
    with pytest.raises(ProfileError, match="integer >= 0 or auto"):
        LayerConfig(min_seq_len="fast")
    prof = PbsProfile(defaults=LayerConfig(min_seq_len="auto"), layers={1: {"min_seq_len": 4096}})
    path = tmp_path / "p.yaml"
    prof.save(path)
    back = PbsProfile.load(path)
    assert back.layer(0).min_seq_len == "auto" and back.layer(1).min_seq_len == 4096
    assert PbsProfile.default().defaults.min_seq_len == 16384  # saved and built-in profiles keep their meaning


def test_cached_checks_still_reject_bad_calls():
    q, k, v = rand_qkv(1, 2, 1, 300, 64)
    pbs_attention(q, k, v, window=1, **SMALL)
    with pytest.raises(ValueError, match="window"):
        pbs_attention(q, k, v, window=True, **SMALL)  # True == 1 for a dict, not for the checks
    pbs_attention(q, k, v, vertical_keys=2, **SMALL)
    with pytest.raises(ValueError, match="vertical_keys"):
        pbs_attention(q, k, v, vertical_keys=True, **SMALL)
    with pytest.raises(ValueError, match="threshold"):
        pbs_attention(q, k, v, block_size=64, segment_size=128, threshold=float("nan"))
    with pytest.raises(ValueError, match="graph"):
        pbs_attention(q, k, v, graph="always", **SMALL)


def test_graph_on_cpu_runs_eagerly():
    q, k, v = rand_qkv(1, 4, 2, 600, 64, seed=6)
    assert why_eager(q, k, v, "auto", return_stats=False, cache=None) == "CPU tensors"
    for mode in (True, "auto"):
        assert torch.equal(pbs_attention(q, k, v, graph=mode, **SMALL), pbs_attention(q, k, v, **SMALL))


def test_graph_auto_skips_large_calls():
    big = torch.empty(1, 32, 32768, 128, dtype=torch.bfloat16, device="meta")
    small = torch.empty(1, 9, 32768, 64, dtype=torch.bfloat16, device="meta")
    assert not auto_worth_it(big) and auto_worth_it(small)


@pytest.mark.parametrize("N,G", [(700, 3), (1000, 1)], ids=["T700-G3", "T1000-G1"])
def test_legacy_host_path_gives_the_same_output(monkeypatch, N, G):
    # The fused score LSE, one-launch pooling and int64 sink must not change a single tile.
    q, k, v = rand_qkv(1, 2 * G, 2, N, 64, seed=7)
    new, st_new = pbs_attention(q, k, v, backend="triton", return_stats=True, **SMALL)
    monkeypatch.setattr(_host, "LEGACY_HOST", True)
    old, st_old = pbs_attention(q, k, v, backend="triton", return_stats=True, **SMALL)
    assert torch.equal(st_new.blocks.dense_mask(), st_old.blocks.dense_mask())
    assert torch.equal(st_new.pos, st_old.pos)
    assert rel_err(new, old) < 1e-5, f"rel {rel_err(new, old):.2e} max {max_err(new, old):.2e}"


def test_lse_combine_kernel():
    # More chunks than one tile of columns (BLOCK_C = 64), rows that see -inf chunks.
    from pbs_kernels.ops.permute.score import _lse_combine

    R, NC = 130, 150
    m = torch.randn(R, NC) * 4
    m[:, 100:][torch.rand(R, 50) < 0.5] = float("-inf")
    l = torch.rand(R, NC) + 0.1
    l[m == float("-inf")] = 0.0
    want = torch.logsumexp((m + torch.log2(l)) * torch.log(torch.tensor(2.0)), dim=1) / torch.log(torch.tensor(2.0))
    got = torch.full((R,), float("nan"))
    _lse_combine[(3,)](m.contiguous(), l.contiguous(), got, R, NC, BLOCK_R=64, BLOCK_C=64)
    assert rel_err(got, want) < 1e-6, f"max {max_err(got, want):.2e}"


# ---------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)


def _cuda_qkv(HQ, H, N, D, seed):
    return rand_qkv(1, HQ, H, N, D, dtype=torch.bfloat16, seed=seed, device="cuda")


def _same(got, want):
    """The replay runs the eager call's kernels on the same data: equal, up to the pooled-score
    GEMM, whose cuBLAS algorithm may differ inside a capture (a near-tie of the top-p cut)."""
    return torch.equal(got, want) or rel_err(got, want) < 1e-3


@pytest.mark.gpu
def test_graph_replay_equals_eager_on_fresh_inputs():
    graphs = PbsGraphs()
    from pbs_kernels import graphs as graphs_mod

    old, graphs_mod._DEFAULT = graphs_mod._DEFAULT, graphs
    try:
        for seed in range(3):  # capture, then two replays on fresh data of the same shape
            q, k, v = _cuda_qkv(9, 3, 2048, 64, seed)
            got = pbs_attention(q, k, v, graph=True)
            want = pbs_attention(q, k, v)
            assert _same(got, want), f"seed {seed}: rel {rel_err(got, want):.2e} max {max_err(got, want):.2e}"
        assert (graphs.captures, graphs.replays) == (1, 2)
        got.fill_(float("nan"))  # the caller owns its output: the next replay is unaffected
        q, k, v = _cuda_qkv(9, 3, 2048, 64, 9)
        assert _same(pbs_attention(q, k, v, graph=True), pbs_attention(q, k, v))
        q, k, v = _cuda_qkv(9, 3, 3000, 64, 10)  # a new shape recaptures
        assert _same(pbs_attention(q, k, v, graph=True), pbs_attention(q, k, v))
        assert graphs.captures == 2
        q, k, v = _cuda_qkv(9, 3, 200, 64, 11)  # the dense fallback runs eagerly: never captured
        assert _same(pbs_attention(q, k, v, graph=True), pbs_attention(q, k, v))
        assert graphs.captures == 2 and not graphs.failed
    finally:
        graphs_mod._DEFAULT = old


@pytest.mark.gpu
def test_graph_auto_captures_on_the_second_call_and_varlen_falls_back():
    graphs = PbsGraphs()
    from pbs_kernels import graphs as graphs_mod

    old, graphs_mod._DEFAULT = graphs_mod._DEFAULT, graphs
    try:
        q, k, v = _cuda_qkv(8, 1, 2048, 128, 1)
        first = pbs_attention(q, k, v, graph="auto")
        assert graphs.captures == 0 and graphs.eager == 1
        second = pbs_attention(q, k, v, graph="auto")
        assert graphs.captures == 1 and _same(second, first)
        _, st = pbs_attention(q, k, v, graph=True, return_stats=True)  # statistics: eager
        assert graphs.replays == 0 and not st.dense
        # packed varlen reads cu_seqlens on the host: eager, the same output as without graph
        lens = [700, 900, 800]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        qp, kp, vp = (torch.randn(sum(lens), h, 64, device="cuda", dtype=torch.bfloat16) for h in (4, 2, 2))
        before = graphs.captures
        got = pbs_attention_varlen(qp, kp, vp, cu, cu, max(lens), max(lens), graph=True, packed=True, **SMALL)
        want = pbs_attention_varlen(qp, kp, vp, cu, cu, max(lens), max(lens), packed=True, **SMALL)
        assert graphs.captures == before and torch.equal(got, want)
    finally:
        graphs_mod._DEFAULT = old


@pytest.mark.gpu
def test_graph_output_matches_fp32_reference():
    q, k, v = _cuda_qkv(4, 1, 4096, 128, 3)
    out = pbs_attention(q, k, v, threshold=1.0, graph=True)
    assert rel_err(out, dense_ref(q.float(), k.float(), v.float())) < 2e-2
