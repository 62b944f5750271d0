"""A killed `pbs tune` resumes cleanly and to the same profile.

A SIGKILL leaves the trial that was running in the study as RUNNING (a journal storage has no
heartbeat that would ever fail it). Resuming must fail it, with a note saying why, re-run what it
was doing, and end on the profile an uninterrupted run writes: the samplers draw from the seed
and the trials completed so far, not from how many times the command was started.

Only `pbs_cli.app.main`, the `python -m pbs_cli` entry point and Optuna's own storage API are
used, so the test does not depend on the package's internals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pbs_cli.app import main

N = 1024
TRIALS = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from _models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("resume") / "local_llama")


def tune_args(model_dir: Path, out: Path, log: Path) -> list[str]:
    return ["tune", str(model_dir), "--target-speedup", "1.2", "--seq-len", str(N), "--device", "cpu",
            "--trials", str(TRIALS), "--seed", "3", "--out", str(out), "--storage", f"journal:{log}",
            "--format", "json"]


def run_pbs(args, capsys) -> dict:
    capsys.readouterr()
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def trials_of(log: Path, storage=None) -> dict[str, list]:
    """Study name -> its trials, read from the journal file (`storage`: one already open on it,
    which reads only what was appended since)."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = storage or JournalStorage(JournalFileBackend(str(log)))
    return {s.study_name: storage.get_all_trials(s._study_id, deepcopy=False) for s in storage.get_all_studies()}


def _state(trials, state: str) -> list:
    return [t for t in trials if t.state.name == state]


def test_killed_tune_resumes_to_the_uninterrupted_profile(model_dir, tmp_path, capsys):
    from pbs_kernels.profile import PbsProfile

    # The run that is never interrupted.
    whole = run_pbs(tune_args(model_dir, tmp_path / "whole.yaml", tmp_path / "whole.log"), capsys)

    # The same command in a process that is SIGKILLed while a trial runs (no clean-up can run).
    out, log = tmp_path / "killed.yaml", tmp_path / "killed.log"
    # Same thread count as this process: the figures (and so the samplers' choices) stay bitwise equal.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env.pop("PBS_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "pbs_cli", *tune_args(model_dir, out, log)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
            if not log.exists():
                continue
            storage = storage or JournalStorage(JournalFileBackend(str(log)))
            studies = trials_of(log, storage)
            done = sum(len(_state(t, "COMPLETE")) for t in studies.values())
            running = [(name, t.number) for name, ts in studies.items() for t in _state(ts, "RUNNING")]
            if 2 <= done < 2 * TRIALS - 2 and running:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, "the tune ended before it could be killed: " + \
            proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    studies = trials_of(log)
    left = [(name, t.number) for name, ts in studies.items() for t in _state(ts, "RUNNING")]
    assert left, "the kill left no RUNNING trial to clean up"

    resumed = run_pbs(tune_args(model_dir, out, log), capsys)  # the same command again

    studies = trials_of(log)
    still = [(t.number, t.user_attrs, t.datetime_start) for ts in studies.values() for t in _state(ts, "RUNNING")]
    assert not still, f"trials still RUNNING: {still}"
    for name, number in left:
        trial = next(t for t in studies[name] if t.number == number)
        assert trial.state.name == "FAIL"
        note = json.dumps(trial.user_attrs).lower()
        assert "killed" in note or "resum" in note, f"trial {number} of {name} failed without a note: {trial.user_attrs}"
    for name, ts in studies.items():
        assert len(_state(ts, "COMPLETE")) == TRIALS, name

    a, b = PbsProfile.load(whole["profile_path"]), PbsProfile.load(resumed["profile_path"])
    assert (a.defaults, a.layers) == (b.defaults, b.layers), "the resumed profile differs from the uninterrupted one"
    for la, lb in zip(whole["layers"], resumed["layers"]):
        assert la["chosen"]["config"] == lb["chosen"]["config"]
        assert sorted((p["error"], p["cost"]) for p in la["front"]) == sorted((p["error"], p["cost"]) for p in lb["front"])
