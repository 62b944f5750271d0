"""What a new user hit on a fresh clone (issue 24), one table per kind of check.

Each row of the issue has cases here: the command as a user types it, and what a careful user
expects back. Like tests/cli/test_errors.py, commands run through `pbs_cli.app.main` in a fresh
working folder with PBS_DEBUG unset; only `pbs_cli.app` and public file formats (profile YAML,
Optuna's journal, JSON documents) are read, so the tests do not depend on the package's inside.
"""

from __future__ import annotations

import json
import os
import re
import signal
import traceback
from pathlib import Path

import pytest

from pbs_cli.app import main


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from _models import save_tiny_llama
    from pbs_kernels.profile import LayerConfig, PbsProfile

    root = tmp_path_factory.mktemp("newuser")
    tiny = save_tiny_llama(root / "tiny", layers=1, max_positions=2048)
    binary = root / "random.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    latin = root / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 40)
    other = PbsProfile(model="org/other-model")
    other.set_layer(7, LayerConfig(threshold=0.8))  # the demo model has 4 layers
    other_path = other.save(root / "other.yaml")
    return {"tiny": tiny, "binary": binary, "latin": latin, "other": other_path,
            "demo_profile": Path(__file__).resolve().parents[2] / "profiles" / "demo.yaml"}


def run_pbs(args, capsys, monkeypatch, columns: int = 80) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `pbs ARGS` at a terminal `columns` wide."""
    monkeypatch.delenv("PBS_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", str(columns))
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - what the user would see
        out, err = capsys.readouterr()
        pytest.fail(f"a traceback reached the user of `pbs {' '.join(map(str, args))}`:\n{err[-1500:]}\n"
                    f"{traceback.format_exc()[-3000:]}")
    out, err = capsys.readouterr()
    return code, out, err


def fill(args, files, cwd) -> list[str]:
    names = {**{k: str(v) for k, v in files.items()}, "cwd": str(cwd)}
    return [a.format(**names) for a in args]


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def usage_text(err: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", " ", err)


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------------
# Rows 1 and 2: Ctrl-C during `pbs tune`, then the same command again.

TUNE_N, TUNE_TRIALS = "512", "8"


def tune_args(model: Path, out: Path, log: Path) -> list[str]:
    # --keep-best: the comparison is of the profiles, whatever speedup the tiny model reaches.
    return ["tune", str(model), "--target-speedup", "1.02", "--seq-len", TUNE_N, "--device", "cpu",
            "--trials", TUNE_TRIALS, "--seed", "3", "--out", str(out), "--storage", f"journal:{log}",
            "--format", "json", "--keep-best"]


def journal_trials(log: Path, storage=None) -> list:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = storage or JournalStorage(JournalFileBackend(str(log)))
    return [t for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id, deepcopy=False)]


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory) -> dict:
    """The tune never interrupted, run as its own process like the interrupted one."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("whole")
    env = {k: v for k, v in os.environ.items() if k != "PBS_DEBUG"}
    done = subprocess.run([sys.executable, "-m", "pbs_cli", *tune_args(files["tiny"], root / "p.yaml", root / "s.log")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


# (id, completed trials when Ctrl-C is sent): during a seed trial (the analysis' starting points,
# enqueued) and during a trial the sampler drew.
INTERRUPTS = [("during-a-seed-trial", 1), ("during-a-sampled-trial", int(TUNE_TRIALS) - 1)]


@pytest.mark.slow
@pytest.mark.parametrize("after", [pytest.param(a, id=i) for i, a in INTERRUPTS])
def test_ctrl_c_tune_says_so_and_resumes_to_the_uninterrupted_profile(files, uninterrupted, tmp_path, after):
    import subprocess
    import sys
    import time

    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from pbs_kernels.profile import PbsProfile

    out, log = tmp_path / "p.yaml", tmp_path / "s.log"
    env = {k: v for k, v in os.environ.items() if k != "PBS_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "pbs_cli", *tune_args(files["tiny"], out, log)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
            if not log.exists():
                continue
            storage = storage or JournalStorage(JournalFileBackend(str(log)))
            trials = journal_trials(log, storage)
            done = sum(t.state.name == "COMPLETE" for t in trials)
            if done >= after and any(t.state.name == "RUNNING" and t.user_attrs.get("pbs_worker") for t in trials):
                proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{stderr[-2000:]}"
    assert "Traceback" not in stderr and stdout == "", stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert lines == ["error: interrupted; rerun the same command to resume (finished trials are kept in --storage)"], \
        stderr[-2000:]
    assert "PBS_DEBUG" not in stderr
    assert not out.exists(), "an interrupted tune wrote a profile"

    failed = [t for t in journal_trials(log) if t.state.name == "FAIL"]
    assert failed, "Ctrl-C left no failed trial"
    notes = json.dumps([s.user_attrs for s in JournalStorage(JournalFileBackend(str(log))).get_all_studies()]
                       + [t.user_attrs for t in failed])
    assert all(f"interrupted:{t.number}" in notes or "interrupted" in str(t.user_attrs) for t in failed), notes

    resumed = subprocess.run([sys.executable, "-m", "pbs_cli", *tune_args(files["tiny"], out, log)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trials = journal_trials(log)
    assert sum(t.state.name == "COMPLETE" for t in trials) == int(TUNE_TRIALS)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    # Every setting the uninterrupted run evaluated, the resumed study evaluated too.
    whole, again = uninterrupted, json.loads(resumed.stdout)
    a, b = PbsProfile.load(whole["profile_path"]), PbsProfile.load(again["profile_path"])
    assert (a.defaults, a.layers, a.metrics) == (b.defaults, b.layers, b.metrics), \
        "the resumed profile differs from the uninterrupted one"
    for la, lb in zip(whole["layers"], again["layers"]):
        assert sorted((p["error"], p["cost"]) for p in la["front"]) == sorted((p["error"], p["cost"]) for p in lb["front"])
