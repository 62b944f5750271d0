"""The `pbs` app: help, profile commands, the error boundary, output channels, import cost."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pbs_cli.workflows.errors import ModelError, PbsError
from pbs_cli.commands._output import Output, to_jsonable
from pbs_kernels._io import write_atomic
from pbs_cli.app import app, main
from pbs_kernels.profile import LayerConfig, PbsProfile

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "profiles" / "default.yaml"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), prog_name="pbs")


@pytest.fixture
def tuned(tmp_path) -> Path:
    p = PbsProfile(model="org/tiny", metrics={"measured_speedup": 2.04, "device": "[cpu]"})
    p.set_layer(0, LayerConfig(dense=True))
    p.set_layer(5, LayerConfig(threshold=0.75))
    return p.save(tmp_path / "tuned.yaml")


@pytest.fixture
def broken(tmp_path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text("schema_version: 1\nlayers: {3: {threshold: 1.5}}\n")
    return path


def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for name in ("analyze", "tune", "bench", "profile"):
        assert name in r.stdout
    r = invoke("profile", "--help")
    assert r.exit_code == 0 and "show" in r.stdout and "validate" in r.stdout


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.startswith("pbs ")


def test_profile_show_json_on_stdout_only(tuned):
    r = invoke("profile", "show", str(tuned), "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # exactly one JSON document
    assert doc["layers"] == {"0": {"dense": True}, "5": {"threshold": 0.75}}
    assert doc["metrics"]["measured_speedup"] == 2.04
    assert PbsProfile.from_dict(doc) == PbsProfile.load(tuned)
    assert r.stderr == ""


def test_profile_show_table_on_stderr(tuned):
    r = invoke("profile", "show", str(tuned))
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    for text in ("block_size", "layer overrides", "0.75", "measured_speedup", "[cpu]", "org/tiny"):
        assert text in r.stderr, text


def test_profile_validate_ok():
    r = invoke("profile", "validate", str(DEFAULT))
    assert r.exit_code == 0, r.output
    assert f"ok: {DEFAULT}" in r.stderr and r.stdout == ""


def test_profile_validate_error_exit_1(broken):
    r = invoke("profile", "validate", str(broken))
    assert r.exit_code == 1
    assert isinstance(r.exception, PbsError)


def test_main_prints_one_line_error(broken, capsys, monkeypatch):
    monkeypatch.delenv("PBS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["profile", "validate", str(broken)])
    assert e.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: {broken}: layers.3.threshold = 1.5 is out of range; allowed (0, 1]; fix the file (keys and "
        "allowed values: profiles/README.md) or pass another profile",
        "(set PBS_DEBUG=1 for the traceback)",
    ]


def test_main_missing_profile(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PBS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["profile", "show", str(tmp_path / "nope.yaml")])
    assert e.value.code == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nope.yaml'}: file not found; pass ")


def test_main_debug_reraises(broken, monkeypatch):
    monkeypatch.setenv("PBS_DEBUG", "1")
    with pytest.raises(PbsError, match="layers.3.threshold"):
        main(["profile", "validate", str(broken)])


def test_main_exit_codes(capsys, monkeypatch):
    monkeypatch.delenv("PBS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--seq-len", "not-a-length"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["profile", "validate", str(DEFAULT)])
    assert e.value.code == 0


def test_main_converts_raw_profile_error_and_keeps_bugs(monkeypatch, capsys):
    # A command that lets pbs_kernels' ProfileError escape still gets the one-line treatment;
    # an unexpected exception (a bug) keeps its traceback.
    import pbs_cli.app as app_module
    from pbs_kernels.profile import ProfileError

    monkeypatch.delenv("PBS_DEBUG", raising=False)
    for exc, expected in ((ProfileError("p.yaml: bad"), SystemExit), (ModelError("no such model; check the id"), SystemExit), (KeyError("bug"), KeyError)):
        def fake_app(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr(app_module, "app", fake_app)
        with pytest.raises(expected):
            main(["anything"])
    assert "error: no such model; check the id" in capsys.readouterr().err


def test_output_json_and_tables(capsys):
    @dataclasses.dataclass
    class Result:
        path: Path
        speedup: float
        bad: float

    out = Output("json")
    out.table("ignored in json mode", ["a"], [[1]])
    out.emit_json({"result": Result(Path("x/y"), 2.0, math.nan), 3: (1, 2)})
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"result": {"path": "x/y", "speedup": 2.0, "bad": None}, "3": [1, 2]}
    assert captured.err == ""
    with pytest.raises(RuntimeError):
        out.emit_json({})
    with pytest.raises(TypeError):
        to_jsonable(object())
    with pytest.raises(ValueError):
        Output("xml")

    Output("table").table("speeds", ["seq", "speedup"], [[8192, 1.23456], [32768, None]])
    captured = capsys.readouterr()
    assert captured.out == "" and "speeds" in captured.err and "1.235" in captured.err


def test_progress_callback_plain_when_not_a_terminal(capsys):
    with Output().progress() as report:
        for i in range(1, 4):
            report("layers", i, 3)
        report("layers", 3, 3)  # absolute, so repeating a step is harmless
        report("warmup", 1, None)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("layers: 3/3 done") == 1


def test_write_atomic(tmp_path):
    path = write_atomic(tmp_path / "a" / "b" / "report.json", '{"x": 1}')
    assert path.read_text() == '{"x": 1}'
    write_atomic(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    assert os.listdir(path.parent) == ["report.json"]


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_importing_the_app_stays_light():
    # pbs_kernels itself may load (its __init__ is lazy): only the heavy libraries must not.
    heavy = ["torch", "triton", "transformers", "optuna", "matplotlib", "numpy", "pbs_kernels.attention"]
    r = _run_python(f"import sys, json, pbs_cli.app; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "pbs_cli", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "analyze" in r.stdout
