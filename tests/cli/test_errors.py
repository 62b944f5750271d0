"""Every failure a user can cause: one line naming the problem and the fix, before the work.

Table-driven over every command (analyze, tune, bench, profile show/validate, eval when it is
registered). Each case runs `pbs_cli.app.main` in a fresh working folder, as a user would, with
PBS_DEBUG unset, and checks:

* the exit code: 2 for an option value that cannot be parsed, 1 for everything else;
* no traceback, nothing on stdout (so `--format json | jq` never reads half a document);
* exactly one `error: ...` line (plus the PBS_DEBUG hint) that names the problem and a fix;
  nothing else on stderr, which is how a case shows that no work (no progress, no "analysing"
  line) ran before the failure;
* nothing written: the working folder holds the same files before and after (no report, no
  partial or temporary file, no empty --out folder).

Only `pbs_cli.app` (main, and app to see whether eval is registered) is imported from pbs_cli,
so the tests do not depend on how the package is laid out inside.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from _cli import run_pbs, snapshot
from pbs_cli.app import app

CUDA = torch.cuda.is_available()

# Words with which a message tells the user what to do.
FIX_WORDS = ("use ", "pass ", "download", "save", "install", "drop ", "lower", "run ", "check ", "fix ",
             "choose", "remove", "try ", "upgrade", "rename", "delete", "give ", "add ", "set ", "copy ")


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny Llama saved with save_pretrained, and broken copies of it.


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from _models import save_tiny_llama
    from pbs_kernels.profile import LayerConfig, PbsProfile

    root = tmp_path_factory.mktemp("errors")
    tiny = save_tiny_llama(root / "tiny", max_positions=2048)

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny, root / name))

    truncated = copy("truncated")  # a download or copy that stopped half-way
    weights = truncated / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    garbage = copy("garbage_config")
    (garbage / "config.json").write_text('{"model_type": "llama", "hidden_size": 128,\n')  # cut JSON
    unknown = copy("unknown_type")
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (unknown / "config.json").write_text(json.dumps(cfg))
    no_weights = copy("no_weights")
    (no_weights / "model.safetensors").unlink()
    no_config = copy("no_config")
    (no_config / "config.json").unlink()

    blocker = root / "blocker"  # a regular file: nothing can be written under it
    blocker.write_text("not a folder\n")
    broken = root / "broken.yaml"
    broken.write_text("schema_version: 1\nlayers: {3: {threshold: 1.5}}\n")
    garbage_yaml = root / "garbage.yaml"
    garbage_yaml.write_text("layers: {3: [\n")
    listing = root / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    nofit = PbsProfile(model="org/other")
    nofit.set_layer(5, LayerConfig(threshold=0.8))  # the tiny model has 2 layers
    nofit_path = nofit.save(root / "nofit.yaml")
    prompt = root / "prompt.txt"
    prompt.write_text("the quick brown fox jumps over the lazy dog\n")
    empty = root / "empty.txt"
    empty.write_text("")
    folder = root / "a_folder"
    folder.mkdir()
    return {
        "tiny": tiny, "truncated": truncated, "garbage_config": garbage, "unknown_type": unknown,
        "no_weights": no_weights, "no_config": no_config, "blocker": blocker, "broken": broken,
        "garbage_yaml": garbage_yaml, "list_yaml": listing, "nofit": nofit_path, "prompt": prompt,
        "empty": empty, "folder": folder, "weights_file": tiny / "model.safetensors",
    }


def error_line(err: str) -> str:
    """The one `error:` line; everything else on stderr must be the PBS_DEBUG hint."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one `error:` line on stderr, got:\n{err}"
    others = [line for line in lines if line is not errors[0] and "PBS_DEBUG" not in line]
    assert not others, f"stderr has more than the error (did work start before it?):\n{err}"
    return errors[0].removeprefix("error: ")


def usage_text(err: str) -> str:
    """Typer's usage-error box as one line."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", err)


# ---------------------------------------------------------------------------------------------
# The table. Placeholders {name} are the fixture's paths; {cwd} is the case's working folder.

FAST_A = ["--seq-len", "256", "--block-size", "32", "--segment-size", "64", "--device", "cpu"]
FAST_T = ["--target-speedup", "1.5", "--seq-len", "256", "--trials", "2", "--device", "cpu"]
FAST_B = ["--device", "cpu", "--seq-len", "1024", "--heads", "2", "--kv-heads", "1", "--head-dim", "64"]

# (id, args, exit code, substrings the message must hold (case-insensitive), substrings it must not)
CASES = [
    # -- analyze: option values (exit 2)
    ("analyze-block-size", ["analyze", "{tiny}", *FAST_A, "--block-size", "48"], 2, ["--block-size", "48"], []),
    ("analyze-segment", ["analyze", "{tiny}", *FAST_A, "--segment-size", "100"], 2, ["--segment-size"], []),
    ("analyze-coverage", ["analyze", "{tiny}", *FAST_A, "--coverage", "1.5"], 2, ["--coverage"], []),
    ("analyze-threshold", ["analyze", "{tiny}", *FAST_A, "--threshold", "0"], 2, ["--threshold"], []),
    ("analyze-seq-len-word", ["analyze", "{tiny}", *FAST_A, "--seq-len", "lots"], 2, ["--seq-len"], []),
    ("analyze-format", ["analyze", "{tiny}", *FAST_A, "--format", "xml"], 2, ["--format"], []),
    ("analyze-dtype", ["analyze", "{tiny}", *FAST_A, "--dtype", "fp8"], 2, ["--dtype"], []),
    ("analyze-device", ["analyze", "{tiny}", *FAST_A, "--device", "tpu"], 2, ["--device"], []),
    ("analyze-layers-syntax", ["analyze", "{tiny}", *FAST_A, "--layers", "1-x"], 2, ["--layers"], []),
    # -- analyze: values that parse but do not fit (exit 1)
    ("analyze-layers-range", ["analyze", "{tiny}", *FAST_A, "--layers", "7"], 1, ["layer 7", "2 layers"], []),
    ("analyze-seq-len-long", ["analyze", "{tiny}", *FAST_A, "--seq-len", "4096"], 1, ["--seq-len", "2048"], []),
    ("analyze-input-missing", ["analyze", "{tiny}", *FAST_A, "--input", "{cwd}/missing.txt"], 1,
     ["missing.txt", "not found"], []),
    ("analyze-input-folder", ["analyze", "{tiny}", *FAST_A, "--input", "{folder}"], 1, ["a_folder"], []),
    ("analyze-input-empty", ["analyze", "{tiny}", *FAST_A, "--input", "{empty}"], 1, ["empty.txt", "empty"], []),
    ("analyze-model-missing", ["analyze", "{cwd}/nope", *FAST_A], 1, ["nope"], []),
    ("analyze-model-file", ["analyze", "{weights_file}", *FAST_A], 1, ["model.safetensors", "folder"], []),
    ("analyze-model-no-config", ["analyze", "{no_config}", *FAST_A], 1, ["config.json"], []),
    ("analyze-model-garbage-config", ["analyze", "{garbage_config}", *FAST_A], 1,
     ["config.json", "cannot"], ["neither a local folder", "download it"]),
    ("analyze-model-unknown-type", ["analyze", "{unknown_type}", *FAST_A], 1,
     ["frobnicator", "transformers"], ["your version)", "version of)"]),
    ("analyze-model-truncated", ["analyze", "{truncated}", *FAST_A], 1,
     ["model.safetensors", "truncated"], ["SafetensorError"]),
    ("analyze-model-no-weights", ["analyze", "{no_weights}", *FAST_A], 1, ["weights"], []),
    ("analyze-out-under-file", ["analyze", "{tiny}", *FAST_A, "--out", "{blocker}/report"], 1,
     ["--out", "blocker", "not a folder"], []),
    ("analyze-out-is-file", ["analyze", "{tiny}", *FAST_A, "--out", "{blocker}"], 1,
     ["--out", "blocker", "not a folder"], []),
    ("analyze-json-stays-clean", ["analyze", "{truncated}", *FAST_A, "--format", "json"], 1,
     ["model.safetensors"], []),
    # -- tune
    ("tune-no-target", ["tune", "{tiny}", "--seq-len", "256", "--device", "cpu"], 2, ["--target-speedup"], []),
    ("tune-target-below-1", ["tune", "{tiny}", *FAST_T, "--target-speedup", "0.5"], 2, ["--target-speedup"], []),
    ("tune-target-word", ["tune", "{tiny}", *FAST_T, "--target-speedup", "fast"], 2, ["--target-speedup"], []),
    ("tune-trials-0", ["tune", "{tiny}", *FAST_T, "--trials", "0"], 2, ["--trials"], []),
    ("tune-storage-form", ["tune", "{tiny}", *FAST_T, "--storage", "x.txt"], 2, ["--storage"], []),
    ("tune-out-suffix", ["tune", "{tiny}", *FAST_T, "--out", "{cwd}/p.txt"], 2, ["--out", ".yaml"], []),
    ("tune-seed-word", ["tune", "{tiny}", *FAST_T, "--seed", "x"], 2, ["--seed"], []),
    ("tune-out-under-file", ["tune", "{tiny}", *FAST_T, "--out", "{blocker}/p.yaml"], 1,
     ["--out", "blocker", "not a folder"], []),
    ("tune-out-is-folder", ["tune", "{tiny}", *FAST_T, "--out", "{cwd}/dir.yaml"], 1, ["--out", "dir.yaml", "folder"], []),
    ("tune-storage-under-file", ["tune", "{tiny}", *FAST_T, "--out", "{cwd}/p.yaml", "--storage",
                                 "journal:{blocker}/s.log"], 1, ["blocker", "not a folder"], []),
    ("tune-seq-len-long", ["tune", "{tiny}", *FAST_T, "--seq-len", "4096"], 1, ["--seq-len", "2048"], []),
    ("tune-seq-len-short", ["tune", "{tiny}", *FAST_T, "--seq-len", "32"], 1, ["--seq-len", "too short"], []),
    ("tune-input-missing", ["tune", "{tiny}", *FAST_T, "--input", "{cwd}/missing.txt"], 1, ["missing.txt"], []),
    ("tune-model-truncated", ["tune", "{truncated}", *FAST_T], 1, ["model.safetensors", "truncated"], []),
    ("tune-model-garbage-config", ["tune", "{garbage_config}", *FAST_T], 1, ["config.json", "cannot"],
     ["neither a local folder"]),
    # -- bench
    ("bench-seq-len-word", ["bench", *FAST_B, "--seq-len", "long"], 2, ["--seq-len"], []),
    ("bench-head-dim", ["bench", *FAST_B, "--head-dim", "72"], 2, ["--head-dim", "72"], []),  # 96 runs since issue 23
    ("bench-baselines", ["bench", *FAST_B, "--baselines", "cudnn,foo"], 2, ["--baselines", "foo"], []),
    ("bench-max-error", ["bench", *FAST_B, "--max-error", "-1"], 2, ["--max-error"], []),
    ("bench-workload", ["bench", *FAST_B, "--workload", "mystery"], 2, ["--workload"], []),
    ("bench-heads", ["bench", *FAST_B, "--heads", "6", "--kv-heads", "4"], 1, ["--heads", "--kv-heads"], []),
    ("bench-seq-len-short", ["bench", *FAST_B, "--seq-len", "128"], 1, ["--seq-len"], []),
    ("bench-profile-missing", ["bench", *FAST_B, "--profile", "{cwd}/missing.yaml"], 1, ["missing.yaml"], []),
    ("bench-profile-broken", ["bench", *FAST_B, "--profile", "{broken}"], 1, ["broken.yaml", "threshold"], []),
    ("bench-out-under-file", ["bench", *FAST_B, "--out", "{blocker}/bench"], 1, ["--out", "blocker", "not a folder"], []),
    ("bench-out-is-file", ["bench", *FAST_B, "--out", "{blocker}"], 1, ["--out", "blocker", "not a folder"], []),
    ("bench-captured-truncated", ["bench", *FAST_B, "--workload", "captured", "--model", "{truncated}"], 1,
     ["model.safetensors", "truncated"], []),
    ("bench-captured-layer", ["bench", *FAST_B, "--workload", "captured", "--model", "{tiny}", "--layer", "9"], 1,
     ["layer 9", "2 layers"], []),
    # Item 5: the profile must fit the e2e model before the attention bench runs.
    ("bench-e2e-profile-does-not-fit", ["bench", *FAST_B, "--e2e", "--model", "{tiny}", "--profile", "{nofit}"], 1,
     ["layer 5", "2 layers"], []),
    ("bench-e2e-model-truncated", ["bench", *FAST_B, "--e2e", "--model", "{truncated}"], 1,
     ["model.safetensors", "truncated"], []),
    # -- profile
    ("profile-show-missing", ["profile", "show", "{cwd}/missing.yaml"], 1, ["missing.yaml"], []),
    ("profile-validate-missing", ["profile", "validate", "{cwd}/missing.yaml"], 1, ["missing.yaml"], []),
    ("profile-validate-broken", ["profile", "validate", "{broken}"], 1, ["threshold", "1.5"], []),
    ("profile-validate-garbage", ["profile", "validate", "{garbage_yaml}"], 1, ["garbage.yaml", "yaml"], []),
    ("profile-validate-list", ["profile", "validate", "{list_yaml}"], 1, ["list.yaml"], []),
    ("profile-show-folder", ["profile", "show", "{folder}"], 1, ["a_folder"], []),
    ("profile-show-format", ["profile", "show", "{broken}", "--format", "xml"], 2, ["--format"], []),
]
# `pbs eval` (when registered): the same contract.
FAST_E = ["--seq-len", "1024", "--samples", "1", "--tasks", "niah_single", "--device", "cpu"]
if "eval" in {c.name for c in app.registered_commands}:
    CASES += [
        ("eval-tasks", ["eval", "{tiny}", *FAST_E, "--tasks", "nosuchtask"], 1, ["--tasks"], []),  # a name that parses but is unknown: bad input, exit 1
        ("eval-depths", ["eval", "{tiny}", *FAST_E, "--depths", "2"], 2, ["--depths"], []),
        ("eval-seq-len-word", ["eval", "{tiny}", *FAST_E, "--seq-len", "long"], 2, ["--seq-len"], []),
        ("eval-profile-missing", ["eval", "{tiny}", *FAST_E, "--profile", "{cwd}/missing.yaml"], 1, ["missing.yaml"], []),
        ("eval-profile-broken", ["eval", "{tiny}", *FAST_E, "--profile", "{broken}"], 1, ["broken.yaml"], []),
        ("eval-input-missing", ["eval", "{tiny}", *FAST_E, "--input", "{cwd}/missing.txt"], 1, ["missing.txt"], []),
        ("eval-model-truncated", ["eval", "{truncated}", *FAST_E], 1, ["model.safetensors", "truncated"], []),
        ("eval-model-garbage-config", ["eval", "{garbage_config}", *FAST_E], 1, ["config.json"], []),
        ("eval-out-under-file", ["eval", "{tiny}", *FAST_E, "--out", "{blocker}/eval"], 1, ["--out", "blocker"], []),
        ("eval-profile-does-not-fit", ["eval", "{tiny}", *FAST_E, "--profile", "{nofit}"], 1, ["layer 5", "2 layers"], []),
    ]
if not CUDA:
    CASES += [
        ("analyze-no-gpu", ["analyze", "{tiny}", *FAST_A, "--device", "cuda"], 1, ["--device"], []),
        ("tune-no-gpu", ["tune", "{tiny}", *FAST_T, "--device", "cuda"], 1, ["--device"], []),
    ]


@pytest.mark.parametrize("args,code,needles,banned", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_is_one_line_before_the_work(files, tmp_path, capsys, monkeypatch, args, code, needles, banned):
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "dir.yaml").mkdir()
    monkeypatch.chdir(cwd)
    names = {**{k: str(v) for k, v in files.items()}, "cwd": str(cwd)}
    args = [a.format(**names) for a in args]
    before = snapshot(cwd), snapshot(files["tiny"].parent)

    rc, out, err = run_pbs(args, capsys, monkeypatch)

    assert rc == code, f"exit {rc}, expected {code}:\n{err}"
    assert "Traceback" not in out + err
    assert out == "", f"stdout must stay empty on failure:\n{out}"
    if code == 2:
        message = usage_text(err)
    else:
        message = error_line(err)
        assert any(w in message.lower() for w in FIX_WORDS), f"the message names no fix: {message}"
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} missing from: {message}"
    for word in banned:
        assert word.lower() not in message.lower(), f"{word!r} in: {message}"
    assert (snapshot(cwd), snapshot(files["tiny"].parent)) == before, "the failed command left files behind"


# ---------------------------------------------------------------------------------------------
# Item 3, second half: an output that fails only at the end keeps the results and says where.


def _fail_replace_under(monkeypatch, folder: Path):
    """os.replace into `folder` fails as a full or read-only disk would, after all the work."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(Path(dst).resolve()).startswith(str(folder.resolve())):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


def _existing_paths(message: str) -> list[Path]:
    return [Path(m.rstrip(".,;:)")) for m in re.findall(r"(/[^\s'\"`]+)", message) if Path(m.rstrip(".,;:)")).exists()]


@pytest.fixture
def late(tmp_path, monkeypatch):
    """A working folder, a temp folder of its own, and an --out folder whose writes fail late."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    out = cwd / "out"
    _fail_replace_under(monkeypatch, out)
    return out


def _saved_elsewhere(err: str, out: Path) -> list[Path]:
    message = error_line(err)
    assert "No space left on device" in message, message
    saved = [p for p in _existing_paths(message) if out.resolve() not in (p.resolve(), *p.resolve().parents)]
    assert saved, f"the message says nowhere the results went: {message}"
    # Nothing partial in --out: no temporary files left behind.
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not leftovers, leftovers
    return saved


def test_analyze_late_write_failure_keeps_the_report(files, late, capsys, monkeypatch):
    rc, out, err = run_pbs(["analyze", files["tiny"], *FAST_A, "--out", late, "--format", "json"], capsys, monkeypatch)
    assert rc == 1 and "Traceback" not in err
    json.loads(out)  # the results were still printed
    saved = _saved_elsewhere(_last_error(err), late)
    reports = [p for s in saved for p in ([s] if s.is_file() else s.rglob("report.json"))]
    assert any(json.loads(p.read_text()).get("seq_len") == 256 for p in reports if p.name == "report.json")


def test_tune_late_write_failure_keeps_the_profile(files, late, capsys, monkeypatch):
    from pbs_kernels.profile import PbsProfile

    # The study storage lives outside --out's folder, so only the profile write fails.
    storage = late.parent / "studies.log"
    rc, out, err = run_pbs(["tune", files["tiny"], "--target-speedup", "1.2", "--seq-len", "1024", "--trials", "6",
                            "--device", "cpu", "--out", late / "p.yaml", "--storage", f"journal:{storage}"],
                           capsys, monkeypatch)
    assert rc == 1 and "Traceback" not in err
    saved = _saved_elsewhere(_last_error(err), late)
    profiles = [p for s in saved for p in ([s] if s.is_file() else s.rglob("*.yaml"))]
    assert profiles and PbsProfile.load(profiles[0]).tuned_for["seq_len"] == 1024


def test_bench_late_write_failure_keeps_the_results(late, capsys, monkeypatch):
    rc, out, err = run_pbs(["bench", *FAST_B, "--baselines", "none", "--out", late], capsys, monkeypatch)
    assert rc == 1 and "Traceback" not in err
    saved = _saved_elsewhere(_last_error(err), late)
    results = [p for s in saved for p in ([s] if s.is_file() else s.rglob("results.json"))]
    assert results and json.loads(results[0].read_text())["results"]


@pytest.mark.skipif("eval" not in {c.name for c in app.registered_commands}, reason="pbs eval is not registered")
def test_eval_late_write_failure_keeps_the_reports(files, late, capsys, monkeypatch):
    rc, out, err = run_pbs(["eval", files["tiny"], *FAST_E, "--depths", "0.5", "--out", late, "--format", "json"],
                           capsys, monkeypatch)
    assert rc == 1 and "Traceback" not in err
    doc = json.loads(out)  # the results were still printed
    saved = _saved_elsewhere(_last_error(err), late)
    reports = [p for s in saved for p in ([s] if s.is_file() else s.rglob("eval.json"))]
    assert reports and json.loads(reports[0].read_text())["results"] == doc["results"]
    # The printed document names where the files are now, not the --out that failed.
    assert sorted(doc["files"]) == ["json", "md", "png"]
    assert all(Path(p).is_file() and late.resolve() not in Path(p).resolve().parents for p in doc["files"].values())


def _last_error(err: str) -> str:
    """A late failure comes after the command's own output: keep the error line and the hint."""
    lines = err.splitlines()
    i = max(j for j, line in enumerate(lines) if line.startswith("error: "))
    return "\n".join(lines[i:])
