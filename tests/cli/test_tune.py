"""`pbs tune`: allocation, cost model, search space, studies (resume, kill, mismatch), the CLI.

The model is a tiny Llama saved with save_pretrained and loaded the real way. Its weights are
random except that every token embedding shares one large direction and q_proj = k_proj, with a
small RoPE base: queries and keys are nearly the same vector, so q·k follows RoPE's kernel of
the distance and attention is sharply local, a structure PBS can exploit (uniform random
attention has nothing to skip).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pbs_cli.workflows.errors import UsageError
from pbs_cli.app import app, main
from pbs_cli.workflows.tune.alloc import Choice, allocate, fastest_speedup, pareto_front
from pbs_cli.workflows.tune.cost import predicted_cost
from pbs_cli.workflows.tune.study import SearchSpace, StudyMismatchError, open_storage, open_study, parse_storage, seed_configs
from pbs_kernels.profile import LayerConfig, PbsProfile
from pbs_kernels.settings import PbsSettings

N = 1024
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), prog_name="pbs")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pbs_kernels.demo import VOCAB, build_demo_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                      rope_theta=100.0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.1).add_(torch.randn(128))
        for layer in model.model.layers:
            w = torch.randn(64, 128) * 0.35
            layer.self_attn.q_proj.weight.copy_(torch.cat([w, w], 0))
            layer.self_attn.k_proj.weight.copy_(w)
    folder = tmp_path_factory.mktemp("local_llama")
    model.save_pretrained(folder)
    build_demo_tokenizer().save_pretrained(folder)
    return folder


def tune_args(model_dir, out, *extra):
    return ["tune", str(model_dir), "--seq-len", str(N), "--device", "cpu", "--out", str(out), *extra]


# ---------------------------------------------------------------------------------------------
# Allocation (pure).


def _brute(fronts, target, w):
    import itertools

    best = None
    for picks in itertools.product(*[range(len(f)) for f in fronts]):
        cost = sum(wl * f[i].cost for wl, f, i in zip(w, fronts, picks)) / sum(w)
        if cost <= 1 / target + 1e-12:
            err = sum(f[i].error for f, i in zip(fronts, picks))
            best = err if best is None else min(best, err)
    return best


def test_allocate_matches_brute_force():
    import random

    rng = random.Random(0)
    for _ in range(200):
        L = rng.randint(1, 4)
        fronts = [[Choice(0.0, 1.0)] + [Choice(rng.random(), rng.uniform(0.1, 1.2)) for _ in range(rng.randint(0, 4))]
                  for _ in range(L)]
        w = [rng.uniform(0.5, 2.0) for _ in range(L)]
        target = rng.uniform(1.0, 4.0)
        best = _brute(fronts, target, w)
        a = allocate(fronts, target, w)
        if best is None:
            assert a is None
            assert fastest_speedup(fronts, w) < target
            continue
        assert a is not None and a.cost <= 1 / target + 1e-9
        # Costs are rounded up to a 1/4000 grid of the budget: at worst a hair more error.
        assert a.error <= best + 0.05, (a, best)


def test_allocate_prefers_least_error_then_cheapest():
    # Two layers, target 2x: the costs must average 0.5.
    fronts = [
        [Choice(0.0, 1.0, "dense"), Choice(0.01, 0.5, "a"), Choice(0.05, 0.2, "b")],
        [Choice(0.0, 1.0, "dense"), Choice(0.01, 0.5, "c"), Choice(0.001, 0.6, "d")],
    ]
    a = allocate(fronts, 2.0)
    assert [f[i].payload for f, i in zip(fronts, a.picks)] == ["a", "c"]  # 0.02 beats b + d (0.051)
    assert a.error == pytest.approx(0.02) and a.speedup == pytest.approx(2.0)
    # Equal error: the cheaper combination.
    fronts = [[Choice(0.0, 0.5, "slow"), Choice(0.0, 0.3, "fast")], [Choice(0.0, 0.5, "only")]]
    a = allocate(fronts, 2.0)
    assert [f[i].payload for f, i in zip(fronts, a.picks)] == ["fast", "only"]


def test_allocate_exact_small_case():
    fronts = [[Choice(0.0, 1.0), Choice(0.1, 0.4)], [Choice(0.0, 1.0), Choice(0.3, 0.4)]]
    # 2x needs total 1.0: dense + sparse (1.4) is too slow, both sparse (0.8) fits.
    a = allocate(fronts, 2.0)
    assert a.picks == [1, 1] and a.speedup == pytest.approx(2.5)
    # 1.4x (budget 1.43): keep the worse layer dense, sparsify the better one.
    a = allocate(fronts, 1.4)
    assert a.picks == [1, 0] and a.error == pytest.approx(0.1)
    assert allocate(fronts, 3.0) is None
    assert fastest_speedup(fronts) == pytest.approx(2.5)


def test_pareto_front():
    pts = [Choice(0.5, 0.2), Choice(0.1, 0.5), Choice(0.2, 0.6), Choice(0.0, 1.0), Choice(0.6, 0.3)]
    front = pareto_front(pts)
    assert [(c.error, c.cost) for c in front] == [(0.5, 0.2), (0.1, 0.5), (0.0, 1.0)]


# ---------------------------------------------------------------------------------------------
# Cost model and search space.


def test_predicted_cost_shape():
    base = dict(block_size=128, n_tokens=32768)
    assert predicted_cost(density=0.1, permute=False, **base) < predicted_cost(density=0.2, permute=False, **base)
    assert predicted_cost(density=0.1, permute=True, **base) > predicted_cost(density=0.1, permute=False, **base)
    # Per computed tile, small tiles are slower.
    assert predicted_cost(density=0.1, permute=False, block_size=64, n_tokens=32768) > \
        predicted_cost(density=0.1, permute=False, **base)
    # Dense tiles at the kernel's efficiency cost more than dense attention itself.
    assert predicted_cost(density=1.0, permute=False, **base) > 1.0


def test_search_space():
    assert SearchSpace.for_length(32768).block_sizes == (64, 128)
    assert SearchSpace.for_length(1024).block_sizes == (16, 32, 64, 128)
    assert SearchSpace.for_length(300).block_sizes == (16, 32, 64)
    with pytest.raises(UsageError, match="too short"):
        SearchSpace.for_length(40)
    space = SearchSpace.for_length(512, min_seq_len=512)
    cfg = space.config(PbsSettings(block_size=128, segment_size=128 * 8, threshold=0.9, permute=True))
    assert cfg.segment_size == 256  # clipped: at least two segments in the prompt
    assert cfg.min_seq_len == 512
    again = space.params(cfg)
    assert again["block_size"] == 128 and again["permute"] is True
    b = again["block_size"]
    assert space.config(PbsSettings(block_size=b, segment_size=b * again["segment_blocks"], threshold=1 - again["tail"],
                                    permute=again["permute"])) == cfg
    seeds = seed_configs(space, None)
    assert seeds and all(s.block_size == 32 for s in seeds)  # >= 16 blocks in 512 tokens


@pytest.mark.parametrize("n", [300, 1100], ids=["N300", "N1100"])
def test_layer_evaluator(n):
    from pbs_cli.workflows.tune.layer import LayerCapture, LayerEvaluator
    from pbs_kernels.attention import dense_causal_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, n, 64) * 2, torch.randn(1, 2, n, 64) * 2, torch.randn(1, 2, n, 64)
    ev = LayerEvaluator(LayerCapture(0, q, k, v, 0.125), cost_model="predicted")
    ref = dense_causal_attention(q, k, v, scale=0.125)
    assert (ev.ref_out - ref).abs().max() < 1e-4  # the reference is dense attention
    exact = ev.evaluate(LayerConfig(block_size=32, segment_size=64, threshold=1.0, min_seq_len=0))
    assert exact.error < 1e-5 and exact.recall == pytest.approx(1.0, abs=1e-5)
    sparse = ev.evaluate(LayerConfig(block_size=32, segment_size=64, threshold=0.3, min_seq_len=0))
    assert sparse.error > 1e-3 and sparse.recall < 1.0 and sparse.density < exact.density
    assert sparse.cost == sparse.predicted_cost and sparse.time_ms is None
    dense = ev.evaluate(LayerConfig(dense=True))
    assert (dense.error, dense.recall, dense.cost) == (0.0, 1.0, 1.0)


def test_parse_storage(tmp_path):
    assert parse_storage("postgresql://u:p@h/db") == ("rdb", "postgresql://u:p@h/db")
    assert parse_storage("journal:/x/y.log") == ("journal", "/x/y.log")
    assert parse_storage("runs/tune.log") == ("journal", "runs/tune.log")
    assert parse_storage(str(tmp_path / "t.db")) == ("rdb", f"sqlite:///{tmp_path / 't.db'}")
    with pytest.raises(UsageError, match="is not a storage"):
        parse_storage("tune.txt")


def test_open_study_refuses_other_conditions(tmp_path):
    storage, label = open_storage(str(tmp_path / "s.db"), tmp_path / "x.yaml")
    assert label.startswith("sqlite:///")
    ident = {"n_tokens": 512, "calibration": "abc"}
    open_study(storage, "s-layer0", ident, seed=0)
    open_study(storage, "s-layer0", dict(ident), seed=0)  # same conditions: loads
    with pytest.raises(StudyMismatchError, match="n_tokens=512.*n_tokens=1024"):
        open_study(storage, "s-layer0", {**ident, "n_tokens": 1024}, seed=0)


# ---------------------------------------------------------------------------------------------
# The command.


def test_tune_json_profile_and_resume(model_dir, tmp_path):
    import optuna

    out = tmp_path / "tiny.yaml"
    r = invoke(*tune_args(model_dir, out, "--target-speedup", "1.2x", "--trials", "3", "--format", "json"))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for key in ("model", "seq_len", "target_speedup", "cost_model", "storage", "study", "layers", "search",
                "validation", "metrics", "profile", "profile_path"):
        assert key in doc, key
    assert doc["seq_len"] == N and doc["cost_model"] == "predicted"
    assert len(doc["layers"]) == 2
    for layer in doc["layers"]:
        assert layer["trials_before"] == 0 and layer["trials_run"] == 3 and layer["trials_complete"] == 3
        assert layer["chosen"] in layer["front"]
        assert layer["front"][-1]["config"]["dense"] or any(p["config"]["dense"] is False for p in layer["front"])
        assert set(layer["heldout"]) >= {"error", "recall", "density", "cost"}
    v = doc["validation"]
    assert v["speedup"] >= 1.2 * 0.97 and v["ppl_dense"] > 0 and "ppl_change" in v and v["kl"] >= 0
    assert doc["search"]["speedup"] >= 1.2

    # The profile: saved atomically, loads, validates, carries the metrics, applies to the model.
    profile = PbsProfile.load(out)
    assert profile.tuned_for == {"seq_len": N, "target_speedup": 1.2, "objective": "min_error"}
    for key in ("cost_model", "predicted_speedup", "recall", "error", "kl", "ppl_dense", "ppl_pbs", "ppl_change"):
        assert key in profile.metrics, key
    assert profile.metrics["cost_model"] == "predicted"
    # Task accuracy on held-out retrieval prompts, dense and PBS, within the default 1-point drop.
    # The random tiny model cannot retrieve: dense is below the floor, so the check is blind: it
    # runs no PBS check, counts nothing as passed and says it cannot check.
    m = profile.metrics
    assert m["accuracy_check"] == "blind" and m["accuracy_tasks"] == "niah_single,niah_multikey"
    assert m["accuracy_prompts"] == 12 and m["accuracy_dense"] < 0.8 and "accuracy_pbs" not in m
    assert doc["accuracy"]["status"] == "blind" and doc["accuracy"]["chosen"] is None and not doc["accuracy"]["checks"]
    assert any(note.startswith("cannot check task accuracy") for note in doc["notes"])
    assert invoke("profile", "validate", str(out)).exit_code == 0
    from transformers import AutoModelForCausalLM

    from pbs_kernels.integrations.hf import apply_profile, pbs_stats, remove_profile

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    apply_profile(model, out, collect_stats=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, N)), use_cache=False)
    assert any(not s.dense for s in pbs_stats(model).values())
    remove_profile(model)

    # Default storage: a SQLite file beside the output; trials carry their constraints.
    db = out.with_suffix(".optuna.db")
    assert db.is_file()
    study = optuna.load_study(study_name=f"{doc['study']}-layer0", storage=f"sqlite:///{db}")
    trial = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))[0]
    assert set(trial.constraints) == {"slower_than_dense", "layer_error"}
    assert "config" in trial.user_attrs

    # A bigger budget on the same command reuses the completed trials.
    r = invoke(*tune_args(model_dir, out, "--target-speedup", "1.2x", "--trials", "5", "--format", "json"))
    assert r.exit_code == 0, r.output
    doc2 = json.loads(r.stdout)
    assert doc2["study"] == doc["study"]
    for layer in doc2["layers"]:
        assert (layer["trials_before"], layer["trials_run"], layer["trials_complete"]) == (3, 2, 5)
    # And the same budget again runs nothing new.
    r = invoke(*tune_args(model_dir, out, "--target-speedup", "1.2x", "--trials", "5", "--format", "json"))
    assert all(layer["trials_run"] == 0 for layer in json.loads(r.stdout)["layers"])


def test_unreachable_target_is_one_line_and_saves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PBS_DEBUG", raising=False)
    out = tmp_path / "never.yaml"
    with pytest.raises(SystemExit) as e:
        main(tune_args(model_dir, out, "--target-speedup", "50x", "--trials", "2",
                       "--storage", str(tmp_path / "never.log")))
    assert e.value.code == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert "target 50x is out of reach: the fastest settings found give" in line
    assert "predicted attention speedup" in line
    assert not out.exists()
    assert (tmp_path / "never.log").is_file()  # the journal storage keeps the trials for a rerun


def test_accuracy_out_of_reach_is_one_line_and_saves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    from pbs_cli.workflows.tune import accuracy

    real = accuracy.walk_for_accuracy

    def failing(model, tokenizer, fronts, target, max_drop, build, **kw):
        # floor 0: the random model's dense accuracy would make the check blind (it checks nothing)
        walk = real(model, tokenizer, fronts, target, max_drop, build, **{**kw, "floor": 0.0})
        for c in walk.checks:  # as if PBS lost 30 points at every allocation checked
            c.accuracy, c.drop_points, c.passed = walk.dense_accuracy - 0.3, 30.0, False
        walk.chosen = None
        return walk

    monkeypatch.setattr(accuracy, "walk_for_accuracy", failing)
    monkeypatch.delenv("PBS_DEBUG", raising=False)
    out = tmp_path / "never.yaml"
    with pytest.raises(SystemExit) as e:
        main(tune_args(model_dir, out, "--target-speedup", "1.2x", "--trials", "2", "--max-accuracy-drop", "1"))
    assert e.value.code == 1
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("error: "))
    assert "target 1.2x is out of reach within --max-accuracy-drop 1" in line
    assert "the most accurate profile checked gives" in line
    assert not out.exists()


def test_bad_storage_is_exit_2(model_dir, tmp_path):
    r = invoke(*tune_args(model_dir, tmp_path / "x.yaml", "--target-speedup", "2", "--storage", "x.txt"))
    assert r.exit_code == 2 and "is not a storage" in r.output


def _completed(storage, name: str) -> int:
    import optuna

    study = next((st for st in storage.get_all_studies() if st.study_name == name), None)
    if study is None:
        return 0
    return len(storage.get_all_trials(study._study_id, deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def test_killed_tune_resumes(model_dir, tmp_path):
    """SIGKILL a tune mid-study (no clean-up runs), rerun the same command: it keeps the
    completed trials, runs only the missing ones, and finishes."""
    import optuna

    trials = 20
    out = tmp_path / "killed.yaml"
    db = out.with_suffix(".optuna.db")
    args = tune_args(model_dir, out, "--target-speedup", "1.2", "--trials", str(trials), "--format", "json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pbs_cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    storage, names = None, []
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
            try:
                # One storage object for all polls: opening one is the slow part.
                storage = storage or optuna.storages.RDBStorage(f"sqlite:///{db}", skip_table_creation=True)
                names = sorted(st.study_name for st in storage.get_all_studies())
            except Exception:  # noqa: BLE001 - no file or no tables yet
                storage = None
                continue
            if names and _completed(storage, names[0]) >= 2:
                break
        assert proc.poll() is None, "the tune finished (or failed) before it could be killed: " + \
            proc.stderr.read().decode()[-2000:]
        assert names, "no trial completed in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {name: _completed(storage, name) for name in names}
    assert 2 <= before[names[0]] < trials

    r = invoke(*args)  # the same command
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert f"{doc['study']}-layer0" == names[0]
    for layer in doc["layers"]:
        done = before.get(f"{doc['study']}-layer{layer['layer']}", 0)
        assert (layer["trials_before"], layer["trials_run"], layer["trials_complete"]) == (done, trials - done, trials)
    assert PbsProfile.load(doc["profile_path"]).tuned_for["seq_len"] == N


def test_shipped_demo_profile():
    """profiles/demo.yaml: the packaged copy is identical, it was tuned as the README says, and it
    applies to the demo model."""
    from pbs_kernels.demo import demo_model_path
    from pbs_kernels.profile import builtin_profile

    root = Path(__file__).resolve().parents[2]
    shipped = PbsProfile.load(root / "profiles" / "demo.yaml")
    assert builtin_profile("demo") == shipped
    assert (root / "profiles" / "demo.yaml").read_text() == \
        (root / "kernels" / "pbs_kernels" / "profiles" / "demo.yaml").read_text()
    assert shipped.tuned_for["target_speedup"] == 2.0 and shipped.metrics["cost_model"] == "predicted"
    assert shipped.metrics["predicted_speedup"] >= 2.0 and "ppl_change" in shipped.metrics
    from transformers import AutoModelForCausalLM

    from pbs_kernels.integrations.hf import apply_profile, remove_profile

    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    remove_profile(apply_profile(model, shipped))
