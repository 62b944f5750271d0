"""The bench's GPU-only branches, run on the CPU (issue 20's refactor was checked there by reading
only): a Harness forced to `timed`, a stopwatch for timing.time_ms, SDPA's math backend standing
in for cuDNN/flash, eager FlexAttention for the compiled one, a per-sequence fp32 stand-in for
FlashAttention varlen and a host-time stand-in for timing.call_cost. Every stand-in binds its
arguments to the real function's signature first, so a call the refactor broke fails here, not
minutes into a GPU session. What the rows hold (times, speedups, TFLOP/s, the flex total, the
reference) is checked, and the report is rendered (JSON, CSV, Markdown, the plot) and printed."""
from __future__ import annotations

import inspect
import json
import time
import warnings

import pytest
import torch
from typer.testing import CliRunner

from pbs_cli.app import app
from pbs_cli.workflows import timing
from pbs_cli.workflows.bench import flex as bflex
from pbs_cli.workflows.bench import harness, serving
from pbs_cli.workflows.bench import workflow as bw
from pbs_cli.workflows.bench.render import output_files
from pbs_kernels.reference import dense_reference

COST = ("launches", "gpu_us", "host_us", "wall_us")  # what timing.call_cost returns


def _bound(real):
    """A check that a call's arguments fit `real`'s signature (TypeError otherwise)."""
    sig = inspect.signature(real)
    return lambda *a, **kw: sig.bind(*a, **kw)


@pytest.fixture
def timed(monkeypatch):
    """The timed branches on this CPU; returns the counts of stand-in calls."""
    calls = {"time_ms": 0, "call_cost": 0, "varlen": 0, "compiled_flex": 0}
    fits_time, fits_cost = _bound(timing.time_ms), _bound(timing.call_cost)
    fits_sdpa, fits_varlen = _bound(timing.sdpa_runner), _bound(serving.varlen_dense)
    fits_mask = _bound(bflex.flex_block_mask)
    real_runner, real_mask = timing.sdpa_runner, bflex.flex_block_mask

    def stopwatch(fn, **kw):
        fits_time(fn, **kw)
        calls["time_ms"] += 1
        fn()  # time_ms's untimed first call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def host_cost(fn, **kw):
        fits_cost(fn, **kw)
        calls["call_cost"] += 1
        t0 = time.perf_counter()
        fn()
        us = (time.perf_counter() - t0) * 1e6
        return dict(launches=0.0, gpu_us=0.0, host_us=us, wall_us=us)

    def math_runner(name, q, k, v, **kw):
        fits_sdpa(name, q, k, v, **kw)
        if name == "efficient":
            return timing.SdpaRun(name, None, "not on this card")
        return timing.SdpaRun(name, real_runner("math", q, k, v, **kw).fn)

    def varlen_fp32(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        """Dense causal attention per packed sequence, bottom-right aligned, in q's dtype."""
        fits_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale)
        assert q.dim() == 3 and k.shape[1] <= q.shape[1] and max_q <= max_k

        def call():
            calls["varlen"] += 1
            bq, bk = cu_q.tolist(), cu_k.tolist()
            outs = [dense_reference(*(t[a:b].transpose(0, 1)[None] for t, a, b in
                                      ((q, bq[i], bq[i + 1]), (k, bk[i], bk[i + 1]), (v, bk[i], bk[i + 1]))),
                                    scale)[0].transpose(0, 1) for i in range(len(bq) - 1)]
            return torch.cat(outs).to(q.dtype)

        return call

    def eager_flex():
        # torch.compile of FlexAttention takes minutes on 2 CPU cores; the eager one on a mask
        # that checks the tiles computes the same thing (flex.py's CPU path).
        from torch.nn.attention.flex_attention import flex_attention

        def run(*a, **kw):
            calls["compiled_flex"] += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return flex_attention(*a, **kw)

        return run

    def tile_checked(*a, **kw):
        fits_mask(*a, **kw)
        return real_mask(*a, **{**kw, "tile_checked_mask": True})

    real_init = harness.Harness.__init__

    def timed_init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.timed = self.profiled = True  # the backend stays torch: the CPU's

    monkeypatch.setattr(harness.Harness, "__init__", timed_init)
    monkeypatch.setattr(timing, "time_ms", stopwatch)
    monkeypatch.setattr(timing, "call_cost", host_cost)
    monkeypatch.setattr(timing, "sdpa_runner", math_runner)
    monkeypatch.setattr(serving, "varlen_dense", varlen_fp32)
    monkeypatch.setattr(bflex, "_compiled", eager_flex)
    monkeypatch.setattr(bflex, "flex_block_mask", tile_checked)
    return calls


def _profile(tmp_path, **layer) -> str:
    """Blocks of 32: 512 tokens hold several segments (max_error 1 below: the kernel is what is
    gated here, not the sparsity of these settings on this workload)."""
    fields = {"block_size": 32, "segment_size": 64, "threshold": 0.9, "permute": "true", "min_seq_len": 0,
              "dense": "false", **layer}
    path = tmp_path / "p.yaml"
    path.write_text("schema_version: 1\ndefaults: {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}\n")
    return str(path)


def _speedup_ok(row, base_ms):
    return row["speedup"] == pytest.approx(base_ms / row["ms"])


def test_whole_prompt_rows_timed(timed, tmp_path):
    """Dense rows (the fastest as the reference above fp32_ref_max_len), pbs with its call cost,
    its stages, compiled flex over its tiles, pbs-noperm and pbs-auto below min_seq_len."""
    s = bw.BenchSettings(seq_lens=[512], heads=4, kv_heads=2, head_dim=64, device="cpu",
                         profile=_profile(tmp_path, min_seq_len=1024), fp32_ref_max_len=256, max_error=1.0,
                         baselines=("cudnn", "flash", "efficient", "flex", "noperm"))
    report = bw.run_bench(s)
    doc = json.loads(output_files(report)["results.json"])
    res, = doc["results"]
    rows = {m["method"]: m for m in res["methods"]}
    assert list(rows) == ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "pbs", "pbs.permute", "pbs.select",
                          "pbs.attend", "pbs-auto", "flex", "flex.attend", "pbs-noperm"]
    failed = [(m["method"], m["note"]) for m in res["methods"] if m["status"] == "FAILED"]
    assert doc["ok"] and not doc["failed"], failed
    base = res["fastest_dense_ms"]
    assert res["fastest_dense"] in ("cudnn", "flash") and res["reference"] == f"sdpa-{res['fastest_dense']}"
    assert base == rows[res["reference"]]["ms"] and rows[res["reference"]]["error"] == 0.0
    assert rows["sdpa-efficient"]["status"] == "unavailable" and rows["sdpa-efficient"]["ms"] is None
    for name in ("sdpa-cudnn", "sdpa-flash", "pbs", "pbs-auto", "flex", "pbs-noperm"):
        m = rows[name]
        assert m["status"] == "ok" and m["ms"] > 0 and _speedup_ok(m, base), name
        assert m["tflops"] == pytest.approx(m["flops"] / (m["ms"] * 1e-3) / 1e12), name
    for name in ("pbs.permute", "pbs.select", "pbs.attend", "flex.attend"):
        assert rows[name]["ms"] > 0 and rows[name]["speedup"] is None, name
    assert rows["pbs"]["kernel_error"] < 1e-3 and rows["flex.attend"]["kernel_error"] < 1e-3
    # The flex pipeline: PBS's permute and select, then FlexAttention compiled (here: stood in).
    assert rows["flex"]["ms"] == pytest.approx(rows["flex.attend"]["ms"] + rows["pbs.permute"]["ms"]
                                               + rows["pbs.select"]["ms"])
    assert rows["flex.attend"]["note"] == "same tiles as pbs" and timed["compiled_flex"] >= 2
    assert rows["pbs-auto"]["note"] == "dense fallback: 512 tokens < min_seq_len 1024"
    # The pbs row is a graph replay at this size (graph="auto"), its stages eager: a note says so.
    assert [n for n in doc["notes"] if "'pbs' is a CUDA-graph replay" in n] == [
        "at 512 'pbs' is a CUDA-graph replay (graph=auto, as apply_profile runs it); pbs.permute, pbs.select and "
        "pbs.attend are each timed eagerly with their own host cost, so there they add up to more than 'pbs'"]
    # One call_cost of the eager pbs call, carried to the JSON as measured.
    assert timed["call_cost"] == 1 and sorted(res["pbs_call"]) == sorted(COST) and res["pbs_call"]["host_us"] > 0
    # Every row with a time went through time_ms: dense 2, pbs 1 + stages 3, auto, flex, noperm.
    assert timed["time_ms"] == 9
    files = output_files(report)
    assert files["time_vs_seq_len.png"][:4] == b"\x89PNG"
    assert f"| pbs | ok | {rows['pbs']['ms']:.3f} |" in files["results.md"]
    assert "fastest dense " + res["fastest_dense"] in files["results.md"]


def test_permute_off_and_serving_rows_timed(timed, tmp_path):
    """Through the command: permute off (pbs.permute skipped, the stages' time is select's), the
    chunk rows and a packed varlen batch, with speedups against each case's fastest dense row;
    the table printed with its timed columns and every file written."""
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["bench", "--device", "cpu", "--seq-len", "512", "--heads", "4", "--kv-heads", "2",
                                 "--head-dim", "64", "--profile", _profile(tmp_path, permute="false"),
                                 "--baselines", "cudnn,flex", "--max-error", "1", "--chunk", "128",
                                 "--lengths", "150,300",
                                 "--out", str(out)], prog_name="pbs")
    assert r.exit_code == 0, r.output
    assert "CUDA-graph replay" in " ".join(r.stderr.split())  # printed, not only in the JSON
    doc = json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "results.md",
                                                      "time_vs_seq_len.png"]
    prompt, chunk, varlen = doc["results"]
    rows = {m["method"]: m for m in prompt["methods"]}
    assert rows["pbs.permute"]["status"] == "skipped" and rows["pbs.permute"]["ms"] is None
    assert rows["flex"]["ms"] == pytest.approx(rows["flex.attend"]["ms"] + rows["pbs.select"]["ms"])
    assert prompt["pbs_call"] is not None and rows["pbs"]["selection_efficiency"] is None
    assert chunk["case"] == "chunk 128 of 512" and varlen["case"] == "varlen 150+300"
    for res, dense in ((chunk, ("sdpa-lower-right", "varlen-flash")), (varlen, ("dense-per-seq", "varlen-flash"))):
        rows = {m["method"]: m for m in res["methods"]}
        assert res["fastest_dense"] in dense and res["fastest_dense_ms"] == rows[res["fastest_dense"]]["ms"]
        for name in dense:
            assert rows[name]["status"] == "ok" and rows[name]["error"] < 1e-5, (name, rows[name])
        for name, m in rows.items():
            assert m["status"] == "ok" and m["ms"] > 0 and _speedup_ok(m, res["fastest_dense_ms"]), name
    assert {"pbs-chunk", "pbs-chunk-nocache"} <= {m["method"] for m in chunk["methods"]}
    assert "2 sequences PBS, 0 dense" in {m["method"]: m for m in varlen["methods"]}["pbs-varlen"]["note"]
    assert timed["varlen"] >= 4  # checked and timed, in both cases
    # The console table shows the timed columns (left out on the CPU pass).
    assert "speedup" in r.stderr and "TFLOP/s" in r.stderr


def test_a_cuda_device_makes_a_timed_triton_harness_and_env(monkeypatch):
    """What the harness and the report header are on a GPU (the device object only; nothing runs)."""
    from pbs_kernels.profile import LayerConfig

    from pbs_cli.workflows.bench.render import header_line

    cuda = torch.device("cuda")
    cfg = bw.PbsConfig(LayerConfig(min_seq_len=4096), "defaults")
    h = harness.Harness(bw.BenchSettings(seq_lens=[8192]), cfg, cuda, torch.bfloat16, lambda *a: None)
    assert h.timed and h.profiled and h.backend == "triton"
    assert h.kernel_tol == harness.KERNEL_TOL["low"] and h.max_error == 0.05
    # Timed as apply_profile runs it: graph="auto" (a replay for a q of at most 64 MiB).
    assert h.pbs_kwargs(min_seq_len=0) == {**cfg.layer.plan_kwargs(), "min_seq_len": 0, "backend": "triton",
                                           "graph": "auto"}
    assert h.pbs_kwargs()["min_seq_len"] == 4096
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert bw.resolve_bench_device("auto") == cuda and bw.resolve_bench_device("cuda") == cuda
    env = bw.environment(cuda, torch.bfloat16)
    assert (env.device, env.cuda, env.dtype, env.timing) == ("NVIDIA H200", "12.8", "bfloat16",
                                                            "median of triton.testing.do_bench; pbs calls "
                                                            "with graph=auto, as apply_profile")
    report = bw.BenchReport(env, {}, cfg, "synthetic")
    assert header_line(report).startswith("device NVIDIA H200 | CUDA 12.8 | ")


def test_no_replay_note_above_the_capture_size(timed, tmp_path, monkeypatch):
    """A q above graphs.AUTO_MAX_Q_BYTES runs eagerly under graph="auto": no replay note."""
    from pbs_kernels import graphs

    monkeypatch.setattr(graphs, "AUTO_MAX_Q_BYTES", 0)
    s = bw.BenchSettings(seq_lens=[512], heads=4, kv_heads=2, head_dim=64, device="cpu",
                         profile=_profile(tmp_path), max_error=1.0, baselines=("cudnn",))
    doc = json.loads(output_files(bw.run_bench(s))["results.json"])
    assert doc["ok"] and not [n for n in doc["notes"] if "CUDA-graph replay" in n]
