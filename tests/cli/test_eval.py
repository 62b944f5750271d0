"""pbs eval: task generation, Wilson intervals, scoring, bad input, and the demo model telling a
deliberately aggressive profile from dense attention (CPU, torch backend)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pbs_cli.workflows.eval import (
    TASKS, DepthError, Haystack, LengthBeyondPositions, LengthTooShortForTask, ProfileMismatchError, UnknownTaskError, make_sample,
    make_samples, run_eval, score, wilson_interval,
)
from pbs_cli.workflows.eval.run import SampleResult, summarize
from pbs_cli.workflows.eval.tasks import ENGLISH_TASKS, detect_grammar


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pbs_kernels.demo import demo_model_path

    path = demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def hay(demo):
    return Haystack.builtin(demo[1], n_tokens=6000)


# -- task generation ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", [t for t in TASKS if t not in ENGLISH_TASKS])  # the demo reads records only
@pytest.mark.parametrize("n", [333, 1000])
def test_exact_length_and_deterministic(demo, hay, task, n):
    tok = demo[1]
    a = make_sample(task, tok, hay, seq_len=n, depth=0.3, seed=5, index=2)
    b = make_sample(task, tok, hay, seq_len=n, depth=0.3, seed=5, index=2)
    c = make_sample(task, tok, hay, seq_len=n, depth=0.3, seed=6, index=2)
    assert len(a.input_ids) == n
    assert a.input_ids == b.input_ids and a.answers == b.answers
    assert a.input_ids != c.input_ids
    assert a.input_ids[0] == tok.bos_token_id and tok.bos_token_id not in a.input_ids[1:]


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_needle_at_its_depth_and_question_at_end(demo, hay, depth):
    tok = demo[1]
    n = 900
    s = make_sample("niah_single", tok, hay, seq_len=n, depth=depth, seed=1)
    assert detect_grammar(tok) == "records" and s.grammar == "records"
    words = tok.convert_ids_to_tokens(s.input_ids)
    at = s.needle_pos[0]
    key = words[at + 1]
    value_words = s.answers[0].split()  # "v017 v233 ;"
    assert words[at] == "put" and words[at + 2 : at + 2 + len(value_words)] == value_words
    assert words[-2:] == ["get", key] and words.count(key) == 2  # written once, asked once
    # Needles go on sentence boundaries: within one filler sentence (< 60 tokens) of the depth.
    assert abs(at - depth * (n - 4)) < 60
    assert depth > 0.0 or at == 1
    assert depth == 0.0 or words[at - 1] == "."


def test_multikey_has_distractors_and_multivalue_all_values(demo, hay):
    tok = demo[1]
    mk = make_sample("niah_multikey", tok, hay, seq_len=2048, depth=0.5, seed=0)
    words = tok.convert_ids_to_tokens(mk.input_ids)
    assert words.count("put") == 1 + 2048 // 512
    mv = make_sample("niah_multivalue", tok, hay, seq_len=1024, seed=0)
    assert mv.match == "all" and len(mv.answers) >= 2
    words = tok.convert_ids_to_tokens(mv.input_ids)
    for p, v in zip(mv.needle_pos, mv.answers):
        assert words[p] == "put" and words[p + 2] == v


def test_vt_chain_and_cwe_counts(demo, hay):
    tok = demo[1]
    vt = make_sample("vt", tok, hay, seq_len=1024, seed=3)
    words = tok.convert_ids_to_tokens(vt.input_ids)
    hops = [words[p : p + 4] for p in vt.needle_pos]
    assert hops[0][2] == vt.answers[0].split()[0]
    for prev, nxt in zip(hops, hops[1:]):
        assert nxt[2] == prev[1]  # each variable is assigned the previous one
    assert words[-1] == hops[-1][1]
    cwe = make_sample("cwe", tok, hay, seq_len=1024, seed=3)
    words = tok.convert_ids_to_tokens(cwe.input_ids)[cwe.needle_pos[0]:]
    counts = {w: words.count(w) for w in set(words) if w.startswith("v")}
    top = sorted(counts, key=counts.get, reverse=True)[:3]
    assert sorted(top) == sorted(cwe.answers)
    assert min(counts[w] for w in top) > max(c for w, c in counts.items() if w not in top)


def test_input_text_haystack(demo, tmp_path):
    tok = demo[1]
    hay = Haystack.from_text(tok, "the cat sees a dog . " * 50 + "\n\nmy red boat . " * 20, source="t.txt")
    s = make_sample("niah_single", tok, hay, seq_len=400, depth=0.5)
    assert len(s.input_ids) == 400 and hay.source == "t.txt"


# -- statistics and scoring ---------------------------------------------------------------------


def test_wilson_interval():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_score_prefix_and_all(demo, hay):
    s = make_sample("niah_single", demo[1], hay, seq_len=500, seed=2)
    ans = s.answers[0]
    assert score(s, ans + " the cat") and score(s, " " + ans)
    assert not score(s, ans.replace(" ;", " v999 ;")) and not score(s, "") and not score(s, "the " + ans)
    mv = make_sample("niah_multivalue", demo[1], hay, seq_len=500, seed=2)
    assert score(mv, " ".join(reversed(mv.answers)) + " ;")
    assert not score(mv, " ".join(mv.answers[:-1]))


def test_summarize_cells():
    rows = [SampleResult("niah_single", 100, 0.5, i, m, ok, "a", "a", 0, 0.0)
            for i, (m, ok) in enumerate([("dense", True), ("dense", True), ("pbs", True), ("pbs", False)])]
    cells, summary, overall = summarize(rows)
    by = {c.method: c for c in cells}
    assert by["dense"].accuracy == 1.0 and by["pbs"].accuracy == 0.5 and by["pbs"].n == 2
    assert overall["pbs"].ci_low < 0.5 < overall["pbs"].ci_high


# -- bad input: errors before any work ----------------------------------------------------------


def test_bad_input_errors(demo, hay):
    from pbs_kernels.profile import PbsProfile

    model, tok = demo
    with pytest.raises(UnknownTaskError, match="unknown task 'ruler'.*niah_single"):
        run_eval(model, tok, tasks=["ruler"], seq_lens=[500])
    with pytest.raises(DepthError, match="outside"):
        run_eval(model, tok, tasks=["niah_single"], depths=[1.5], seq_lens=[500])
    with pytest.raises(LengthBeyondPositions, match="exceeds pbs-demo's 1000 positions"):
        run_eval(model, tok, tasks=["niah_single"], seq_lens=[1001], max_positions=1000, model_name="pbs-demo")
    with pytest.raises(LengthTooShortForTask, match="too few"):
        make_sample("niah_multikey", tok, hay, seq_len=40)
    other = PbsProfile(model="llama-8b")
    other.layers = {7: {"dense": True}}
    with pytest.raises(ProfileMismatchError, match="layer 7 but LlamaForCausalLM has 4 layers"):
        run_eval(model, tok, profile=other, tasks=["niah_single"], seq_lens=[500])
    with pytest.raises(ProfileMismatchError, match="made for llama-8b"):
        run_eval(model, tok, profile=PbsProfile(model="llama-8b"), tasks=["niah_single"], seq_lens=[500],
                 model_name="pbs-demo")


# -- the demo model tells an aggressive profile from dense attention ----------------------------


def _uniform(threshold, **kw):
    from pbs_kernels.profile import LayerConfig, PbsProfile

    cfg = dict(block_size=64, segment_size=64, threshold=threshold, permute=False, min_seq_len=0)
    cfg.update(kw)
    return PbsProfile(model="pbs-demo", defaults=LayerConfig(**cfg))


def test_aggressive_profile_drops_accuracy(demo):
    """Measured (seed 0, 1K tokens, 12 prompts): dense 12/12, threshold 0.2 on every layer 4/12
    before the final rows kept every tile (issue 21), 10/12 since (also at 0.02-0.1 and blocks of
    16-64). Eval must see the two lost prompts as dense-only discordant pairs, the same prompts
    in both methods, and say the drop is not ruled out."""
    model, tok = demo
    kw = dict(tasks=["niah_single", "niah_multikey"], seq_lens=[1024], depths=[0.1, 0.5, 0.9], samples=2, seed=0)
    r = run_eval(model, tok, profile=_uniform(0.2), **kw)
    dense, pbs = r.overall["dense"], r.overall["pbs"]
    assert dense.n == pbs.n == 12
    assert dense.accuracy >= 0.9
    assert pbs.correct < dense.correct, (dense, pbs)
    c = r.paired_overall
    assert (c.n, c.dense_only - c.pbs_only) == (12, dense.correct - pbs.correct)
    assert c.drop_high > c.drop > 0 and c.verdict in ("drop", "no evidence of a drop")
    assert r.drop_points > 0


def test_threshold_one_matches_dense(demo):
    model, tok = demo
    r = run_eval(model, tok, profile=_uniform(1.0), tasks=["niah_single"], seq_lens=[700], depths=[0.2, 0.8],
                 samples=1, seed=1)
    by = {}
    for s in r.sample_results:
        by.setdefault((s.depth, s.index), {})[s.method] = s.prediction
    assert all(v["dense"] == v["pbs"] for v in by.values())


# -- the command ---------------------------------------------------------------------------------


def _cli(*args):
    from typer.testing import CliRunner

    from pbs_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], prog_name="pbs")


def _main_error(capsys, *args) -> tuple[int, str]:
    from pbs_cli.app import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("(set PBS_DEBUG=1"), err  # one line and the hint
    return exc.value.code, err[0]


def test_cli_json_shape_and_files(tmp_path):
    prof = _uniform(0.5).save(tmp_path / "p.yaml")
    r = _cli("eval", "--profile", prof, "--seq-len", "600", "--tasks", "niah_single,vt", "--depths", "0.2,0.8",
             "--samples", "1", "--format", "json", "--out", tmp_path / "ev", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    keys = {"task", "seq_len", "depth", "method", "accuracy", "n", "ci_low", "ci_high"}
    assert doc["results"] and all(keys <= set(c) for c in doc["results"])
    cells = {(c["task"], c["depth"], c["method"]) for c in doc["results"]}
    assert cells == {("niah_single", 0.2, "dense"), ("niah_single", 0.8, "dense"), ("niah_single", 0.2, "pbs"),
                     ("niah_single", 0.8, "pbs"), ("vt", None, "dense"), ("vt", None, "pbs")}
    assert all(c["n"] == 1 and 0 <= c["ci_low"] <= c["accuracy"] <= c["ci_high"] <= 1 for c in doc["results"])
    for kind in ("json", "md", "png"):
        assert Path(doc["files"][kind]).is_file()
    assert json.loads(Path(doc["files"]["json"]).read_text())["results"] == doc["results"]
    assert Path(doc["files"]["png"]).read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input_one_line_before_work(capsys, tmp_path, monkeypatch):
    from pbs_cli.workflows.eval import run as run_mod

    def no_work(*a, **k):
        raise AssertionError("the eval started despite bad input")

    monkeypatch.setattr(run_mod, "greedy_continue", no_work)
    code, line = _main_error(capsys, "eval", "--tasks", "niah_single,ruler", "--out", tmp_path)
    assert code == 1 and line.startswith("error: --tasks: unknown task 'ruler'; choose from passkey, niah_single")
    code, line = _main_error(capsys, "eval", "--seq-len", "40k", "--tasks", "niah_single", "--device", "cpu",
                             "--out", tmp_path)
    assert code == 1 and "--seq-len 40960 plus" in line and "max_position_embeddings 32768" in line
    other = PbsProfile_for_other_model(tmp_path)
    code, line = _main_error(capsys, "eval", "--profile", other, "--seq-len", "600", "--device", "cpu",
                             "--out", tmp_path)
    assert code == 1 and line.startswith("error: --profile sets layer 9 but pbs-demo has 4 layers")
    r = _cli("eval", "--depths", "0.5,1.5", "--out", tmp_path)
    assert r.exit_code == 2 and "outside [0, 1]" in r.output
    assert not list(tmp_path.glob("eval*"))


def PbsProfile_for_other_model(tmp_path):
    from pbs_kernels.profile import PbsProfile

    p = PbsProfile(model="meta-llama/Llama-3.1-8B")
    p.layers = {9: {"dense": True}}
    return p.save(tmp_path / "llama.yaml")


def test_accuracy_walk_moves_down_until_the_drop_holds(demo, monkeypatch):
    """tune's accuracy check: an allocation of threshold-0.2 layers loses accuracy, so the walk
    checks slower allocations (fewer sparse layers) until one holds or the walk ends.

    Since the final rows keep every tile (issue 21) no threshold loses a needle of the demo model
    at 1K tokens under this walk (measured: 0.2 and 0.05 on every layer, 0 points), so the test
    takes that rule out to get an allocation that loses, as selection did before it."""
    from pbs_cli.workflows.tune.accuracy import walk_for_accuracy, walk_targets
    from pbs_cli.workflows.tune.alloc import Choice
    from pbs_kernels.ops.select import naive
    from pbs_kernels.profile import LayerConfig, PbsProfile

    monkeypatch.setattr(naive, "final_rows", lambda last_q, end, block_size: torch.zeros_like(last_q, dtype=torch.bool))

    assert walk_targets(2.0) == [2.0, 1.75, 1.5, 1.25]
    model, tok = demo
    sparse = LayerConfig(block_size=64, segment_size=64, threshold=0.2, permute=False, min_seq_len=0)
    fronts = [[Choice(0.0, 1.0, "dense"), Choice(0.5, 0.3, "sparse")] for _ in range(4)]

    def build(picks):
        p = PbsProfile(model="pbs-demo", defaults=sparse)
        p.layers = {i: {"dense": True} for i, k in enumerate(picks) if k == 0}
        return p

    walk = walk_for_accuracy(model, tok, fronts, 2.0, 1.0, build, seq_len=1024, samples=1)
    assert walk.dense_accuracy == 1.0 and walk.checks
    first = walk.checks[0]
    assert first.target == 2.0 and sum(first.picks) == 3 and not first.passed and first.drop_points > 1
    assert [c.target for c in walk.checks] == sorted({c.target for c in walk.checks}, reverse=True)
    assert all(sum(b.picks) <= sum(a.picks) for a, b in zip(walk.checks, walk.checks[1:]))
    assert walk.chosen is None or (walk.chosen is walk.checks[-1] and walk.chosen.passed)


# -- paired scoring, the floor, lengths at the limit, default tasks that do not fit --------------


def test_mcnemar_and_paired_interval():
    from pbs_cli.workflows.eval.run import mcnemar_exact, paired_difference_interval

    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32) and mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 6) == pytest.approx(2 * 8 / 128)
    # Newcombe (1998), example (a): 36 both, 12 and 2 discordant, 0 neither -> [0.0569, 0.3404].
    lo, hi = paired_difference_interval(36, 12, 2, 0)
    assert lo == pytest.approx(0.0569, abs=1e-4) and hi == pytest.approx(0.3404, abs=1e-4)
    # Nothing discordant: symmetric about 0 and never empty (the corrected correlation).
    for both, neither in [(20, 0), (5, 5), (18, 2)]:
        lo, hi = paired_difference_interval(both, 0, 0, neither)
        assert lo == pytest.approx(-hi) and hi > 0.1
    lo, hi = paired_difference_interval(19, 1, 0, 0)  # one lost of 20: a drop is not shown
    assert lo < 0 < hi


def test_paired_cells_floor_and_verdicts():
    from pbs_cli.workflows.eval.run import pair_up

    rows = []
    def add(task, n, dense, pbs):
        for i, (d, p) in enumerate(zip(dense, pbs)):
            rows.append(SampleResult(task, n, 0.5, i, "dense", d, "a", "a", 0, 0.0))
            rows.append(SampleResult(task, n, 0.5, i, "pbs", p, "a", "a", 0, 0.0))
    add("passkey", 4096, [True] * 12, [True] * 4 + [False] * 8)     # PBS loses 8 of 12
    add("passkey", 8192, [True] * 6 + [False] * 6, [False] * 12)    # dense 50%: blind
    add("niah_single", 4096, [True] * 12, [True] * 12)               # nothing lost
    depth_cells, cells, overall = pair_up(rows)
    by = {(c.task, c.seq_len): c for c in cells}
    drop = by[("passkey", 4096)]
    assert (drop.dense_only, drop.pbs_only, drop.verdict) == (8, 0, "drop") and drop.p_value < 0.01
    assert drop.drop_low > 0 and drop.drop == pytest.approx(8 / 12)
    assert by[("passkey", 8192)].verdict == "blind"  # 6 prompts lost, but dense is below the floor
    same = by[("niah_single", 4096)]
    assert same.verdict == "no evidence of a drop" and same.drop_low < 0 < same.drop_high and same.p_value == 1.0
    assert overall.n == 24 and overall.dense_only == 8  # the blind cell is left out
    assert pair_up([r for r in rows if r.method == "dense"]) == ([], [], None)


def test_limit_fits_answer_and_default_tasks_skip(demo):
    from pbs_cli.workflows.eval.run import prepare_eval

    model, tok = demo
    plan = prepare_eval(model, tok, seq_lens=[1000], depths=[0.5], samples=2, tasks=["niah_single"], max_positions=1000)
    assert all(len(s.input_ids) + s.max_new_tokens == 1000 and s.seq_len == 1000 for s in plan.prompts)
    assert any("shortened to" in n for n in plan.notes)
    plan = prepare_eval(model, tok, seq_lens=[80], depths=[0.5], samples=1)  # the default list
    assert "niah_multikey" not in plan.tasks and "niah_single" in plan.tasks
    assert any(n.startswith("task niah_multikey skipped at 80 tokens") for n in plan.notes)
    with pytest.raises(LengthTooShortForTask, match="niah_multikey"):
        prepare_eval(model, tok, seq_lens=[80], depths=[0.5], samples=1, tasks=["niah_single", "niah_multikey"])
