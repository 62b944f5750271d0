"""`pbs bench` on a CUDA GPU: timings are produced, and the correctness gate holds back the
speedup of a wrong or inaccurate kernel. Run with `make test-gpu` (pytest -m gpu)."""

import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

from pbs_cli.workflows.bench import workflow as bw
from pbs_kernels.reference import dense_reference
from pbs_cli.app import app

pytestmark = pytest.mark.gpu


def _rows(report):
    (result,) = report.results
    return result, {m.method: m for m in result.methods}


def test_bench_8k_all_baselines():
    report = bw.run_bench(bw.BenchSettings(seq_lens=[8192], device="cuda"))
    result, rows = _rows(report)
    assert report.env.device != "cpu" and report.env.cuda and report.env.triton
    assert result.reference == "fp32"
    assert result.fastest_dense in ("cudnn", "flash", "efficient") and result.fastest_dense_ms > 0

    pbs = rows["pbs"]
    assert pbs.status == "ok", pbs.note
    assert pbs.kernel_error < 2e-2 and pbs.error < 0.05, (pbs.kernel_error, pbs.error)
    assert 0.0 < pbs.density < 0.5 and 0.9 < pbs.recall <= 1.0
    assert pbs.ms > 0 and pbs.tflops > 0 and pbs.speedup == pytest.approx(result.fastest_dense_ms / pbs.ms)
    for part in ("pbs.permute", "pbs.select", "pbs.attend"):
        assert rows[part].status == "ok" and 0 < rows[part].ms < pbs.ms * 1.5, part
        assert rows[part].speedup is None

    dense = [m for name, m in rows.items() if name.startswith("sdpa-") and m.status != "unavailable"]
    assert dense, "no dense SDPA backend ran"
    for m in dense:
        assert m.status == "ok" and m.error < 2e-2 and m.density == 1.0, (m.method, m.note)
        assert m.speedup <= 1.0 + 1e-9
    assert max(m.speedup for m in dense) == pytest.approx(1.0)

    flex = rows["flex.attend"]
    if flex.status != "unavailable":
        assert flex.status == "ok", flex.note
        assert flex.kernel_error < 2e-2 and flex.error == pytest.approx(pbs.error, abs=5e-3)
        assert rows["flex"].ms > flex.ms and rows["flex"].speedup is not None

    noperm = rows["pbs-noperm"]
    assert noperm.status == "ok" and noperm.kernel_error < 2e-2 and noperm.ms > 0
    assert report.failed == []


def test_gate_holds_back_a_wrong_kernel(monkeypatch):
    import pbs_kernels.attention as attend_mod  # where PbsPlan.attend looks the kernel up

    real = attend_mod.attend

    def broken(q, k_perm, v_perm, pos, blocks, **kw):
        res = real(q, k_perm, v_perm, pos, blocks, **kw)
        return (res[0].roll(1, dims=2), res[1]) if kw.get("return_lse") else res.roll(1, dims=2)

    monkeypatch.setattr(attend_mod, "attend", broken)
    report = bw.run_bench(bw.BenchSettings(seq_lens=[8192], device="cuda", baselines=("cudnn", "flash")))
    _, rows = _rows(report)
    pbs = rows["pbs"]
    assert pbs.status == "FAILED" and pbs.speedup is None and pbs.kernel_error > 0.1
    assert pbs.ms is not None  # still timed, just not credited
    assert "8192:pbs" in report.failed


def test_gate_max_error():
    report = bw.run_bench(bw.BenchSettings(seq_lens=[8192], device="cuda", baselines=("cudnn", "flash"),
                                           max_error=1e-6))
    _, rows = _rows(report)
    assert rows["pbs"].status == "FAILED" and rows["pbs"].speedup is None
    assert "max error" in rows["pbs"].note
    assert all(m.status == "ok" for name, m in rows.items() if name.startswith("sdpa-") and m.status != "unavailable")


def test_timing_helpers():
    from triton.testing import do_bench

    from pbs_cli.workflows.timing import fastest_dense_ms, sdpa_runner, time_ms

    params = inspect.signature(do_bench).parameters
    assert "warmup" in params and "rep" in params
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    assert 0 < time_ms(lambda: a @ a) < 100
    q = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ref = dense_reference(q, k, v, 128 ** -0.5)
    for name in ("cudnn", "flash", "efficient"):
        run = sdpa_runner(name, q, k, v)
        if run.available:
            assert bw.rel_error(run(), ref) < 2e-2, name
        else:
            assert run.reason, name
    name, ms = fastest_dense_ms(q, k, v)
    assert name in ("cudnn", "flash") and ms > 0


def test_cli_writes_plot(tmp_path):
    r = CliRunner().invoke(app, ["bench", "--seq-len", "8k,16k", "--baselines", "cudnn,flash", "--format", "json",
                                 "--out", str(tmp_path)], prog_name="pbs")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] and [res["seq_len"] for res in doc["results"]] == [8192, 16384]
    assert (tmp_path / "time_vs_seq_len.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
