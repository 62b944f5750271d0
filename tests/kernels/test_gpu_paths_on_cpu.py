"""Code that runs only on a CUDA GPU, driven on the CPU with stand-ins (issue 20's refactor moved
the graph and crossover keys onto PbsSettings; the GPU tests of test_fixed_cost.py skip here).

* PbsGraphs: capture, replay, "auto", eviction and a failed capture, with a stand-in CUDA graph
  whose replay re-runs the captured call on the capture's own input buffers into its own output
  (what a real replay does to the same memory), and no-op streams.
* pbs_attention's graph path (`_attention` -> `pbs_graphs().run(key, _pbs_eager ...)`) with
  `why_eager` answering as it would for CUDA tensors: a capture, then replays on fresh inputs
  equal the eager call; the dense fallback, sinks and other settings are other keys.
* min_seq_len="auto" through graphs, its choice kept in the JSON file under the key pbs_attention
  builds (`choice_key` with `PbsSettings.values()`), read back by a "new process" unmeasured.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import time
from pathlib import Path

import pytest
import torch

from pbs_kernels import attention, crossover, graphs, pbs_attention
from pbs_kernels.attention import dense_causal_attention
from pbs_kernels.graphs import PbsGraphs
from pbs_kernels.settings import PbsSettings

from _ref import rand_qkv

SMALL = dict(block_size=32, segment_size=64, threshold=0.5)


class FakeGraph:
    """torch.cuda.CUDAGraph's stand-in: `replay()` runs `body` (set after the capture)."""

    def __init__(self):
        self.body = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.body()


class FakeStream:
    def __init__(self, device=None):
        self.device = device

    def wait_stream(self, other):
        assert isinstance(other, FakeStream)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Stand-in graphs and streams; pbs_attention's graph path as for CUDA tensors; a fresh
    process graph cache. Yields the state: `fail` (captures raise RuntimeError while set), `calls`
    (fn calls inside a capture)."""
    state = {"fail": False, "captured_calls": 0, "capturing": False}

    @contextlib.contextmanager
    def graph_ctx(graph, **kw):
        assert isinstance(graph, FakeGraph)
        state["capturing"] = True
        try:
            if state["fail"]:
                raise RuntimeError("operation not permitted when stream is capturing\nmore")
            yield
        finally:
            state["capturing"] = False

    real_capture = PbsGraphs._capture

    def capture(self, key, fn, inputs):
        def counted(*t):
            state["captured_calls"] += state["capturing"]
            return fn(*t)

        entry = real_capture(self, key, counted, inputs)
        if entry is not None:
            # A replay: the captured work on the capture's own buffers, into its own output.
            entry.graph.body = lambda: entry.out.copy_(fn(*entry.inputs))
        return entry

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph_ctx)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(PbsGraphs, "_capture", capture)
    # why_eager's answers but "CPU tensors" (an open capture needs CUDA tensors, so none here)
    monkeypatch.setattr(attention, "why_eager", graphs.why_eager_on_device)
    monkeypatch.setattr(graphs, "_DEFAULT", PbsGraphs())
    yield state


def _add(*t):
    return t[0] + 2 * t[1] + (0 if t[2] is None else t[2])


def test_graphs_capture_replay_and_bookkeeping(fake_cuda):
    g = PbsGraphs(max_graphs=2)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    out = g.run("a", _add, (x, y, None))
    assert torch.equal(out, _add(x, y, None)) and (g.captures, g.replays, g.eager) == (1, 0, 0)
    assert fake_cuda["captured_calls"] == 1  # one call recorded, after the warm-up outside
    out.fill_(float("nan"))  # the caller owns its copy
    x2, y2 = torch.randn(3, 4), torch.randn(3, 4)
    again = g.run("a", _add, (x2, y2, None))  # fresh inputs copied into the capture's buffers
    assert torch.equal(again, _add(x2, y2, None)) and g.replays == 1
    assert again.data_ptr() != g._graphs["a"].out.data_ptr()
    z = torch.randn(3, 4)
    assert torch.equal(g.run("b", _add, (x, y, z)), _add(x, y, z))
    # auto: the first call of a key runs eagerly, the second captures
    assert torch.equal(g.run("c", _add, (x, y, None), auto=True), _add(x, y, None)) and g.eager == 1
    assert "c" not in g
    g.run("c", _add, (x, y, None), auto=True)
    assert "c" in g and g.captures == 3
    assert len(g) == 2 and "a" not in g  # least recently used first out ("b" was used after "a")
    # A capture that fails: a warning, the key runs eagerly from then on, never captured again.
    fake_cuda["fail"] = True
    with pytest.warns(RuntimeWarning, match="capture failed"):
        assert torch.equal(g.run("d", _add, (x, y, None)), _add(x, y, None))
    fake_cuda["fail"] = False
    assert g.failed["d"].startswith("operation not permitted") and "\n" not in g.failed["d"]
    g.run("d", _add, (x, y, None))
    assert "d" not in g and g.eager == 3
    g.clear()
    assert len(g) == 0 and not g.failed


@pytest.mark.parametrize("N", [300, 64], ids=["sparse-T300", "dense-T64"])
def test_pbs_attention_graph_replays_equal_eager(fake_cuda, N):
    g = graphs.pbs_graphs()
    for seed in range(3):  # a capture, then two replays on fresh inputs
        q, k, v = rand_qkv(1, 4, 2, N, 64, seed=seed)
        got = pbs_attention(q, k, v, graph=True, **SMALL)
        want = pbs_attention(q, k, v, **SMALL)
        assert torch.equal(got, want), seed
    if N <= SMALL["segment_size"]:
        # The dense fallback runs eagerly under graph=True: a replay's copies only add to it.
        assert (g.captures, g.replays, len(g)) == (0, 0, 0)
        assert torch.equal(got, dense_causal_attention(q, k, v, scale=64 ** -0.5))
        return
    assert (g.captures, g.replays) == (1, 2)
    key, = g._graphs
    assert key[5] is False  # the sparse path's key (dense is never captured)
    s = key[-1]
    assert isinstance(s, PbsSettings) and s.scale == 64 ** -0.5 and s.threshold == SMALL["threshold"]


def test_graph_keys_follow_settings_and_sinks(fake_cuda):
    g = graphs.pbs_graphs()
    q, k, v = rand_qkv(1, 4, 2, 300, 64, seed=4)
    sinks = torch.randn(4)
    pbs_attention(q, k, v, graph=True, **SMALL)
    pbs_attention(q, k, v, graph=True, **{**SMALL, "threshold": 0.7})
    got = pbs_attention(q, k, v, graph=True, sinks=sinks, **SMALL)
    assert g.captures == 3
    q2, k2, v2 = rand_qkv(1, 4, 2, 300, 64, seed=5)
    sinks2 = torch.randn(4)
    got = pbs_attention(q2, k2, v2, graph=True, sinks=sinks2, **SMALL)  # the sinks are an input too
    assert torch.equal(got, pbs_attention(q2, k2, v2, sinks=sinks2, **SMALL)) and g.replays == 1
    # Calls that need the host stay eager (statistics, the torch backend).
    _, st = pbs_attention(q, k, v, graph=True, return_stats=True, **SMALL)
    pbs_attention(q, k, v, graph=True, backend="torch", **SMALL)
    assert g.captures == 3 and g.replays == 1 and not st.dense


def test_auto_min_seq_len_through_graphs_and_the_file(fake_cuda, tmp_path, monkeypatch):
    """The measured choice with graph=True: the sparse path runs through a graph while timed (the
    dense one eagerly, as it would run), the choice is written to the crossover file under pbs_attention's own key and a new process
    reads it back without measuring."""
    monkeypatch.setenv("PBS_CACHE_DIR", str(tmp_path))
    crossover.forget()
    crossover._FILE_LOADED.clear()
    timed, keys = [], []
    real_wins = crossover.sparse_wins

    def timer(fn, device):
        fn()
        timed.append(fn)
        return 1.0 if len(timed) % 2 == 1 else 0.2  # dense first, then sparse: sparse wins

    def wins_with_file(key, run_sparse, run_dense, device, **kw):
        keys.append(key)
        return real_wins(key, run_sparse, run_dense, device, **{**kw, "use_file": True})

    monkeypatch.setattr(crossover, "time_call", timer)
    monkeypatch.setattr(crossover, "sparse_wins", wins_with_file)
    try:
        q, k, v = rand_qkv(1, 4, 2, 300, 64, seed=6)
        out = pbs_attention(q, k, v, min_seq_len="auto", graph=True, **SMALL)
        assert len(timed) == 2 and torch.equal(out, pbs_attention(q, k, v, min_seq_len=0, **SMALL))
        g = graphs.pbs_graphs()
        # the sparse path through a graph; the dense one eagerly (never captured)
        assert g.captures == 1 and [key[5] for key in g._graphs] == [False]
        key, = keys
        want = PbsSettings(**SMALL, min_seq_len="auto", scale=64 ** -0.5).values()
        assert key == crossover.choice_key(q, k, (False, True) + want)  # no sinks; graphed
        rows = json.loads(crossover.cache_path().read_text())
        assert rows == [{"key": list(key), "sparse": True}]
        crossover.forget()
        crossover._FILE_LOADED.clear()  # a new process
        q2, k2, v2 = rand_qkv(1, 4, 2, 300, 64, seed=7)
        out2 = pbs_attention(q2, k2, v2, min_seq_len="auto", graph=True, **SMALL)
        assert len(timed) == 2 and torch.equal(out2, pbs_attention(q2, k2, v2, min_seq_len=0, **SMALL))
    finally:
        crossover.forget()
        crossover._FILE_LOADED.clear()


def _count_validations(monkeypatch) -> list:
    """Calls of `_validate_cached` (the full path's first step; the known-call fast path skips it)."""
    seen = []
    real = attention._validate_cached
    monkeypatch.setattr(attention, "_validate_cached", lambda *a: (seen.append(1), real(*a))[1])
    return seen


@pytest.mark.parametrize("mode", [True, "auto"])
def test_known_call_fast_path_equals_eager(fake_cuda, monkeypatch, mode):
    """A graphed call seen before skips the checks and key build (one lookup, then the replay)
    and still equals the eager call on fresh inputs; the sinks are an input of the replay."""
    g = graphs.pbs_graphs()
    seen = _count_validations(monkeypatch)
    sinks, validated = None, []
    for seed in range(5):
        q, k, v = rand_qkv(1, 4, 2, 300, 64, seed=seed)
        if seed >= 3:
            sinks = torch.randn(4, generator=torch.Generator().manual_seed(seed))
        want = pbs_attention(q, k, v, sinks=sinks, **SMALL)
        before = len(seen)
        got = pbs_attention(q, k, v, graph=mode, sinks=sinks, **SMALL)
        validated.append(len(seen) - before)
        assert torch.equal(got, want), seed
    # graph=True: capture, 2 replays; with sinks (another key): capture, replay.
    # "auto": eager, capture, replay; with sinks: eager, capture.
    assert (g.captures, g.replays) == ((2, 3) if mode is True else (2, 1))
    assert validated == [1, 0, 0, 1, 0] and len(g.calls) == 2  # a key's first call takes the full path


def test_fast_path_leaves_for_per_call_state(fake_cuda):
    """After replays, a call that needs gradients or statistics runs eagerly (neither is in the
    known-call key), and a forgotten min_seq_len="auto" choice is measured again."""
    g = graphs.pbs_graphs()
    q, k, v = rand_qkv(1, 4, 2, 300, 64, seed=9)
    for _ in range(3):
        pbs_attention(q, k, v, graph=True, **SMALL)
    assert (g.captures, g.replays) == (1, 2)
    qg = q.clone().requires_grad_()
    out = pbs_attention(qg, k, v, graph=True, **SMALL)
    assert out.grad_fn is not None and g.replays == 2  # eager, differentiable (torch backend)
    assert torch.equal(out.detach(), pbs_attention(q, k, v, **SMALL))
    with torch.no_grad():
        pbs_attention(qg, k, v, graph=True, **SMALL)
    assert g.replays == 3  # no gradients under no_grad: the replay again
    out, st = pbs_attention(q, k, v, graph=True, return_stats=True, **SMALL)
    assert g.replays == 3 and not st.dense and torch.equal(out, pbs_attention(q, k, v, **SMALL))
    pbs_attention(q, k, v, graph=True, **SMALL)
    assert g.replays == 4


def test_fast_path_measures_a_forgotten_choice_again(fake_cuda, monkeypatch):
    timed = []

    def timer(fn, device):
        fn()
        timed.append(fn)
        return 1.0 if len(timed) % 2 == 1 else 0.2  # dense first, then sparse: sparse wins

    monkeypatch.setattr(crossover, "time_call", timer)
    crossover.forget()
    try:
        q, k, v = rand_qkv(1, 4, 2, 300, 64, seed=10)
        for _ in range(3):
            pbs_attention(q, k, v, graph=True, min_seq_len="auto", **SMALL)
        assert len(timed) == 2
        crossover.forget()
        out = pbs_attention(q, k, v, graph=True, min_seq_len="auto", **SMALL)
        assert len(timed) == 4 and torch.equal(out, pbs_attention(q, k, v, **SMALL))
    finally:
        crossover.forget()


def test_foreach_copy_equals_per_tensor_copies(monkeypatch):
    """One `_foreach_copy_` (the replay's input copies) writes what one copy_ per tensor writes,
    sources of another layout or dtype included (transposed views, float32 sinks into bf16); the
    fallback loop (q over FOREACH_MAX_BYTES, no `_foreach_copy_`, PBS_LEGACY_HOST) too."""
    assert callable(getattr(torch, "_foreach_copy_", None))  # torch 2.11 and 2.13 both have it
    g = torch.Generator().manual_seed(11)
    srcs = [torch.randn(1, 7, 4, 64, generator=g).transpose(1, 2), torch.randn(1, 2, 7, 64, generator=g),
            torch.randn(1, 2, 7, 64, generator=g).to(torch.bfloat16), torch.randn(4, generator=g)]
    want = [torch.empty(t.shape, dtype=torch.bfloat16) for t in srcs]
    for dst, src in zip(want, srcs):
        dst.copy_(src)
    def foreach_spy(d, s_):
        calls.append(len(d))
        torch._foreach_copy_(d, s_)

    calls = []
    monkeypatch.setattr(graphs, "_FOREACH_COPY", foreach_spy)
    for setup in ("foreach", "large", "no-foreach", "legacy"):
        if setup == "large":  # q above FOREACH_MAX_BYTES: one copy_ per tensor
            monkeypatch.setattr(graphs, "FOREACH_MAX_BYTES", want[0].nbytes - 1)
        if setup == "no-foreach":
            monkeypatch.setattr(graphs, "_FOREACH_COPY", None)
        if setup == "legacy":
            monkeypatch.setattr(graphs._host, "LEGACY_HOST", True)
        got = [torch.full(t.shape, float("nan"), dtype=torch.bfloat16) for t in srcs]
        graphs.copy_inputs(got, srcs)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), setup
        assert calls == [4], setup  # the multi-tensor copy ran for "foreach" only


def test_capture_buffers_keep_the_inputs_layout(fake_cuda):
    """The static buffers take the capturing call's strides (transformers' transposed views), and
    a later call of another layout still replays to the eager answer."""
    g = graphs.pbs_graphs()
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in rand_qkv(1, 4, 2, 300, 64, seed=12))
    assert not q.is_contiguous()
    got = pbs_attention(q, k, v, graph=True, **SMALL)
    entry, = g._graphs.values()
    assert [t.stride() for t in entry.inputs[:3]] == [q.stride(), k.stride(), v.stride()]
    assert torch.equal(got, pbs_attention(q, k, v, **SMALL))
    q2, k2, v2 = rand_qkv(1, 4, 2, 300, 64, seed=13)  # contiguous
    assert torch.equal(pbs_attention(q2, k2, v2, graph=True, **SMALL), pbs_attention(q2, k2, v2, **SMALL))
    assert g.replays == 1


# ---------------------------------------------------------------------------------------------
# GPU scripts the next GPU session runs: every call they make, on tiny CPU shapes (the timers,
# the profiler and cuDNN stood in for, each bound to the real signature first).

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bound(real):
    sig = inspect.signature(real)
    return lambda *a, **kw: sig.bind(*a, **kw)


@pytest.fixture
def cpu_for_cuda(monkeypatch):
    """Stand-ins a GPU script's module attributes take: timers that call fn once, a call_cost
    of the right keys, dense SDPA on the math backend, workloads on the CPU at <= 512 tokens."""
    from triton.testing import do_bench

    from pbs_cli.workflows import timing
    from pbs_kernels.workloads import make_workload

    def once(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def stand_ins(module, **extra):
        fits = {name: _bound(real) for name, real in (("do_bench", do_bench), ("time_ms", timing.time_ms),
                                                      ("call_cost", timing.call_cost),
                                                      ("sdpa_runner", timing.sdpa_runner),
                                                      ("make_workload", make_workload))}

        def runner(name, q, k, v, **kw):
            fits["sdpa_runner"](name, q, k, v, **kw)
            return timing.SdpaRun(name, timing.sdpa_runner("math", q, k, v, **kw).fn)

        def workload(n, *a, **kw):
            fits["make_workload"](n, *a, **kw)
            return make_workload(min(n, 512), *a, **{**kw, "device": "cpu"})

        def cost(fn, **kw):
            fits["call_cost"](fn, **kw)
            fn()
            return dict(launches=1.0, gpu_us=1.0, host_us=1.0, wall_us=1.0)

        def bench(fn, *a, **kw):
            fits["do_bench"](fn, *a, **kw)
            return once(fn)

        def time_ms(fn, **kw):
            fits["time_ms"](fn, **kw)
            return once(fn)

        found = {"do_bench": bench, "time_ms": time_ms, "call_cost": cost, "sdpa_runner": runner,
                 "make_workload": workload, **extra}
        for name, fn in found.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fn)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu stand-in")
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    return stand_ins


def test_gpu_fixed_cost_script_on_cpu(cpu_for_cuda, monkeypatch, tmp_path):
    monkeypatch.setenv("PBS_CACHE_DIR", str(tmp_path))
    m = _script("gpu_fixed_cost")
    cpu_for_cuda(m)
    crossover.forget()
    try:
        check = m.check_graph(9, 3, 64, 8192)
        assert check["graph_equals_eager"] and check["err_eager"] < 0.05
        assert len(m.gate_rows()) == 8
        from pbs_kernels.ops.attend import fwd

        split_tiles = fwd.SPLIT_TILES
        rows = m.measure(9, 3, 64, 8192, True)
    finally:
        crossover.forget()
    assert [r["mode"] for r in rows] == ["before", "eager", "nosplit", "g-before", "graph", "g-nosplit", "auto",
                                         "cudnn", "fallback"]
    assert all(r["err"] < 0.05 and r["ms"] > 0 and r["x_cudnn"] > 0 for r in rows)
    assert fwd.SPLIT_TILES == split_tiles  # the split-off modes put it back
    m.show(rows)  # the table's fields all present
    assert not graphs.pbs_graphs().failed


def test_cpu_l2_order_model():
    """scripts/cpu_l2_order.py's L2 model on hand-made programs, and its launch orders on a real
    plan: the kernel's program numbering, every tile read once per program."""
    from pbs_kernels.attention import pbs_plan
    from pbs_kernels.ops.attend.fwd import final_splits

    m = _script("cpu_l2_order")
    # Two programs of one KV head reading the same 3 tiles in lockstep (0, 0, 1, 1, 2, 2): each
    # second read hits, with room for 3 tiles or for 1.
    same = [(0, [0, 1, 2]), (0, [0, 1, 2])]
    assert m.misses(same, 2, 3) == (6, 3) and m.misses(same, 2, 1) == (6, 3)
    # One at a time: with room for 3 the second program hits every tile; with room for 1, none.
    assert m.misses(same, 1, 3) == (6, 3) and m.misses(same, 1, 1) == (6, 6)
    # Different KV heads share nothing.
    assert m.misses([(0, [0, 1]), (1, [0, 1])], 2, 8) == (4, 4)

    q, k, v = rand_qkv(1, 4, 2, 16 * 40 + 5, 64, seed=2)
    blocks = pbs_plan(q, k, v, block_size=16, segment_size=32, threshold=0.5, backend="torch").blocks
    progs = m.programs(blocks, 2, q.shape[2])
    rows = 1 + max(pid for _, pid in progs)
    assert rows == blocks.num_query_blocks + 2 * (final_splits(blocks.num_blocks, 16, None) - 1)
    tiles = int(blocks.n_total.sum())
    for order in m.ORDERS:
        launched = m.launch_order(progs, order, 4, 2, rows)
        assert len(launched) == len(progs) and sum(len(ids) for _, ids in launched) == tiles
    kv = m.launch_order(progs, "kv", 4, 2, rows)
    assert [k for k, _ in kv[:4]] == [0, 0, 0, 0] and kv[1] == progs[1, 0] and kv[2] == progs[0, 1]
    heads = m.launch_order(progs, "heads", 4, 2, rows)
    assert [k for k, _ in heads[:4]] == [0, 0, 1, 1] and heads[0] == progs[0, 0] and heads[2] == progs[2, 0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's launches")
def test_cpu_tune_variants_script():
    """scripts/cpu_tune_variants.py on 3 trials: each trial's kernels are recorded (a plan, the
    attend with and without LSE), and the interpreter's launch is put back afterwards."""
    pytest.importorskip("optuna")
    from triton.runtime.interpreter import InterpretedFunction

    m = _script("cpu_tune_variants")
    run = InterpretedFunction.run
    got = m.main(["--trials", "3"])
    assert InterpretedFunction.run is run
    assert got["variants"]["_select_kernel"] >= 1 and got["select_keys"] >= 1
    assert got["variants"]["_attend_fwd_kernel"] >= 2  # with and without LSE


def test_gpu_ttft_script_on_cpu(cpu_for_cuda, monkeypatch, tmp_path):
    """scripts/gpu_ttft.py end to end on a 2-layer model of the 8B model's head shape (the real
    `shape_attention` on 2 heads of D 128): dense and default rows per length, a tune whose
    first target is out of reach, the tuned rows, and the Amdahl split's arithmetic."""
    pytest.importorskip("optuna")
    from transformers import AutoModelForCausalLM, LlamaConfig

    m = _script("gpu_ttft")

    def tiny(layers, *, structured=True, max_positions=4096, device="cpu"):
        cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                          intermediate_size=256, vocab_size=1000, max_position_embeddings=max_positions,
                          num_hidden_layers=layers, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        m.sys.modules["llama8b_model"].shape_attention(model)
        return model

    cpu_for_cuda(m, build=tiny, fastest_dense_ms=lambda q, k, v, **kw: ("cudnn", 1.0))
    monkeypatch.setattr(m.sys, "argv", ["gpu_ttft.py", "--layers", "2", "--lens", "1k", "--tune", "1k",
                                        "--targets", "50x,1.01x", "--trials", "3", "--reps", "1",
                                        "--out", str(tmp_path)])
    assert m.main() == 0
    doc = json.loads((tmp_path / "ttft.json").read_text())
    row, = doc["rows"]
    assert row["seq_len"] == 1024 and row["attention_dense_ms"] == 2.0  # 2 layers x the stand-in's 1 ms
    assert row["rest_ms"] == pytest.approx(row["ttft_dense_ms"] - 2.0)
    for name in ("defaults", "tuned@1k"):
        assert row[name]["ttft_ms"] > 0 and row[name]["speedup"] == pytest.approx(row["ttft_dense_ms"]
                                                                                  / row[name]["ttft_ms"])
    assert [t["target"] for t in doc["tune"]["tried"]] == ["50x"] and doc["tune"]["target"] == "1.01x"
    assert (tmp_path / "tuned.yaml").is_file()
    assert doc["tune"]["trials_stored"] == 2 * 3 and doc["tune"]["trials_run"] == 0  # 50x's trials, reused
    assert isinstance(doc["tune"]["kernels_compiled"], int)  # Triton's cache (the interpreter adds none)

    # A second call goes on from the first one's trials (--storage) and runs the tune alone (--lens "").
    again = tmp_path / "again"
    monkeypatch.setattr(m.sys, "argv", ["gpu_ttft.py", "--layers", "2", "--lens", "", "--tune", "1k",
                                        "--targets", "1.01x", "--trials", "4", "--storage",
                                        str(tmp_path / "tuned.optuna.db"), "--out", str(again)])
    assert m.main() == 0
    doc = json.loads((again / "ttft.json").read_text())
    assert doc["rows"] == [] and doc["tune"]["trials_stored"] == 2 * 3 and doc["tune"]["trials_run"] == 2 * 1
    assert not (again / "tuned.optuna.db").exists()


def test_gpu_head_dims_script_on_cpu(cpu_for_cuda, monkeypatch):
    m = _script("gpu_head_dims")
    real_attend = m.attend_triton
    fits = _bound(real_attend)

    def attend(q, k, v, pos, blocks, **kw):
        """The Triton attend's knobs checked; the torch reference computes (the interpreter
        would take minutes at D=256)."""
        fits(q, k, v, pos, blocks, **kw)
        return m.attend_naive(q, k, v, pos, blocks, scale=kw["scale"])

    cpu_for_cuda(m, attend_triton=attend)
    monkeypatch.setattr(m, "N_CHECK", 384)
    monkeypatch.setattr(m, "M_CHECK", 100)
    monkeypatch.setattr(m, "N_FP32", 256)
    monkeypatch.setattr(m, "VARLEN", [(301, 301), (1, 1), (400, 70)])
    monkeypatch.setattr(m, "DIMS", (64, 96, 256))
    monkeypatch.setattr(m, "ROWS", [(256, 4, 1), (96, 4, 4)])
    monkeypatch.setattr(m, "SWEEP", m.SWEEP[:1])
    cpu = torch.device("cpu")
    checks = m.correctness(cpu, 0.9, 1)
    assert all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    assert {r["D"] for r in checks} == {64, 96, 256} and any("TMA" in r["check"] for r in checks)
    sweep, = m.sweep(cpu, 0.9)
    assert "note" not in sweep and sweep["ms"] > 0
    rows = m.bench(cpu, [512], 0.9)
    assert len(rows) == 2 and all(r["dense"] in ("cudnn", "flash") and r["err_vs_dense"] < 0.05 for r in rows)


def test_crossover_file_survives_keys_json_cannot_hold(tmp_path, monkeypatch):
    """On CUDA the choice is written to the file: a setting passed as a numpy int (accepted by
    the checks) must not make json.dumps raise inside pbs_attention; a row of another version's
    key (a nested list) must not make the load raise."""
    np = pytest.importorskip("numpy")
    monkeypatch.setenv("PBS_CACHE_DIR", str(tmp_path))
    crossover.forget()
    crossover._FILE_LOADED.clear()
    crossover.cache_path().parent.mkdir(parents=True, exist_ok=True)
    crossover.cache_path().write_text(json.dumps([{"key": [["a"], 1], "sparse": True},
                                                  {"key": ["gpu", 2], "sparse": False}]))
    # Settings are cached by value: a plain-int twin from an earlier test would stand in for the numpy one.
    monkeypatch.setattr(attention, "_SETTINGS", {})
    monkeypatch.setattr(attention, "_REPLACED", {})
    times = iter([1.0, 0.2, 1.0, 0.2])
    real_wins = crossover.sparse_wins
    monkeypatch.setattr(crossover, "sparse_wins", lambda *a, **kw: real_wins(*a, **{**kw, "use_file": True}))
    monkeypatch.setattr(crossover, "time_call", lambda fn, device: (fn(), next(times))[1])
    try:
        q, k, v = rand_qkv(1, 4, 2, 300, 64, seed=8)
        kw = dict(SMALL, block_size=np.int64(32), min_seq_len="auto")
        out = pbs_attention(q, k, v, **kw)
        assert torch.equal(out, pbs_attention(q, k, v, **{**SMALL, "min_seq_len": 0}))
        assert crossover._CHOICES[("gpu", 2)] is False  # the readable row was loaded
        pbs_attention(q, k, v, **{**SMALL, "threshold": 0.6}, min_seq_len="auto")  # a plain key: written
        rows = json.loads(crossover.cache_path().read_text())
        assert [r["key"][0] for r in rows] == ["gpu", "cpu"] and rows[0]["sparse"] is False
        assert rows[1]["key"][-12:-9] == [32, 64, 0.6] and rows[1]["sparse"] is True  # block, segment, threshold
    finally:
        crossover.forget()
        crossover._FILE_LOADED.clear()
