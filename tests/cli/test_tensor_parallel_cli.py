"""`pbs bench --e2e` and `pbs eval` under torchrun (2 CPU processes on gloo), and the refusals.

The runs use the tiny Llama of the tensor-parallel tests (tests/_tp.py: 4 query / 2 KV heads, so
each rank holds one KV group) and compare with one process running the same command: at
threshold 1.0 PBS is dense attention, so what is deterministic (answers, first-token ranks,
logits error) must agree. Rank 0 alone prints and writes: stdout is one JSON document and the
output folder holds one copy of each file.

The refusals (tune, analyze, a bench that is not end to end, a model that cannot be split, the
CPU on a machine with GPUs) are raised before the process group forms, so they are checked in
this process with torchrun's environment variables set; one real torchrun run shows how a model
that cannot be split fails on every rank.
"""
import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("accelerate", reason="transformers' tp_plan needs accelerate (the dev extra installs it)")

from pbs_cli.app import app, main  # noqa: E402

from _tp import torchrun  # noqa: E402

DENSE_PROFILE = ("schema_version: 1\ndefaults: {block_size: 32, segment_size: 64, threshold: 1.0, permute: true, "
                 "min_seq_len: 0, dense: false}\n")


@pytest.fixture
def t1_profile(tmp_path):
    path = tmp_path / "t1.yaml"
    path.write_text(DENSE_PROFILE)
    return path


def _one_process(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], prog_name="pbs")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _under_torchrun(tmp_path, *args):
    res = torchrun(["-m", "pbs_cli", *args], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout), res.stderr  # one JSON document: rank 1 printed nothing


def test_eval_under_torchrun_matches_one_process(tp_llama, t1_profile, tmp_path):
    args = ["eval", tp_llama, "--profile", t1_profile, "--seq-len", "600", "--tasks", "niah_single",
            "--depths", "0.5", "--samples", "2", "--device", "cpu", "--format", "json"]
    tp, err = _under_torchrun(tmp_path, *args, "--out", tmp_path / "tp")
    one = _one_process(*args, "--out", tmp_path / "one")
    assert tp["ranks"] == 2 and one["ranks"] == 1
    assert " ".join(err.split()).count("tensor-parallel over 2 processes") == 1  # rank 0's info line, once
    assert sorted(p.name for p in (tmp_path / "tp").iterdir()) == ["eval.json", "eval.md", "eval_needle.png"]
    assert json.loads((tmp_path / "tp" / "eval.json").read_text())["sample_results"] == tp["sample_results"]

    def answers(doc):
        return [(s["index"], s["method"], s["prediction"], s["correct"], s["first_token_rank"])
                for s in doc["sample_results"]]

    assert len(answers(tp)) == 4 and answers(tp) == answers(one)
    # Threshold 1.0: PBS answers as dense attention does, prompt by prompt.
    by = {(s["index"], s["method"]): s["prediction"] for s in tp["sample_results"]}
    assert all(by[(i, "pbs")] == by[(i, "dense")] for i in (0, 1))
    assert all(v > 0 for v in tp["seconds"].values())


def test_bench_e2e_under_torchrun(tp_llama, t1_profile, tmp_path):
    args = ["bench", "--e2e", "--model", tp_llama, "--profile", t1_profile, "--seq-len", "600",
            "--device", "cpu", "--format", "json"]
    tp, err = _under_torchrun(tmp_path, *args, "--out", tmp_path / "tp")
    assert tp["env"]["ranks"] == 2 and tp["results"] == [] and tp["ok"]
    assert any("slowest rank" in n for n in tp["notes"]) and any("no attention rows" in n for n in tp["notes"])
    (e2e,) = tp["e2e"]
    assert e2e["seq_len"] == 600 and e2e["ttft_dense_ms"] > 0 and e2e["ttft_pbs_ms"] > 0
    # Threshold 1.0 under TP: the timed prefills give dense attention's first token.
    assert e2e["same_token"] and e2e["logits_error"] < 1e-5
    assert sorted(p.name for p in (tmp_path / "tp").iterdir()) == ["results.csv", "results.json", "results.md"]
    assert err.count("time to first token") == 0  # --format json: no table on stderr from any rank
    one = _one_process(*args, "--baselines", "none", "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
                       "--out", tmp_path / "one")
    (e1,) = one["e2e"]
    assert one["env"]["ranks"] == 1 and e1["same_token"] and e1["logits_error"] < 1e-5


SLOW_RANK = """
import json, sys, time
from pbs_cli.workflows import distributed as d
dev = d.rank_device("cpu")
d.start(dev)
r = d.ranks()
d.sync_all(dev)
t0 = time.perf_counter()
time.sleep(0.05 + 0.4 * r.rank)  # rank 1 is the slow one
own = time.perf_counter() - t0
got = d.slowest([own, float(r.rank)], dev)
if r.main:
    json.dump({"own": own, "got": got, "main": d.is_main()}, open(sys.argv[1], "w"))
d.finish()
import torch.distributed as dist
assert not dist.is_initialized()  # finish left the group on every rank
d.finish()  # and a second call is a no-op
"""


def test_rank_zero_reports_the_slowest_rank(tmp_path):
    script = tmp_path / "slow_rank.py"
    script.write_text(SLOW_RANK)
    res = torchrun([script, tmp_path / "out.json"])
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["main"] and doc["own"] < 0.4 <= doc["got"][0] and doc["got"][1] == 1.0


def test_model_that_cannot_be_split_fails_on_every_rank(tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "three-heads"  # a config is all the check reads: it comes before the weights
    LlamaConfig(vocab_size=64, hidden_size=192, intermediate_size=64, num_hidden_layers=1, num_attention_heads=3,
                num_key_value_heads=3, head_dim=64).save_pretrained(folder)
    res = torchrun(["-m", "pbs_cli", "eval", folder, "--device", "cpu", "--out", tmp_path / "ev"], cwd=tmp_path)
    assert res.returncode == 1
    want = (f"{folder}: its 3 query heads and 3 key/value heads do not split evenly over 2 processes; "
            "use torchrun --nproc_per_node 3")
    lines = res.stderr.splitlines()
    ours = [ln for ln in lines if ln.startswith(("error: ", "rank 1: error: "))]
    # Each rank fails at the check; torchrun stops the other rank 0.1 s after the first exits, so
    # one of the two lines may be cut off, never both.
    assert ours and set(ours) <= {f"error: {want}", f"rank 1: error: {want}"}, ours
    assert sum("PBS_DEBUG=1" in ln for ln in lines) <= 1  # the hint from rank 0 only
    assert "pbs_cli" not in res.stderr.split("error:")[0]  # no traceback of ours before the line
    assert not (tmp_path / "ev").exists()


# ---------------------------------------------------------------------------------------------
# Refusals, checked in this process with torchrun's environment.


@pytest.fixture
def rank(monkeypatch):
    def set_rank(r: int = 0, world: int = 2):
        for k, v in (("WORLD_SIZE", world), ("RANK", r), ("LOCAL_RANK", r), ("LOCAL_WORLD_SIZE", world)):
            monkeypatch.setenv(k, str(v))
    set_rank()
    return set_rank


def _error(capsys, *args) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    assert out.out == ""
    return exc.value.code, out.err.strip().splitlines()


def test_tune_refuses_torchrun_and_points_to_storage(rank, capsys, tmp_path):
    code, err = _error(capsys, "tune", "--target-speedup", "2x", "--device", "cpu", "--out", tmp_path / "p.yaml")
    assert code == 1 and len(err) == 2, err
    assert err[0].startswith("error: `pbs tune` does not run under torchrun (2 processes)")
    assert "--storage and --study" in err[0] and "CUDA_VISIBLE_DEVICES=i" in err[0]
    assert not list(tmp_path.iterdir())


def test_analyze_refuses_torchrun(rank, capsys, tmp_path):
    code, err = _error(capsys, "analyze", "--seq-len", "1k", "--device", "cpu", "--out", tmp_path / "a")
    assert code == 1 and err[0].startswith("error: `pbs analyze` does not run under torchrun")


@pytest.mark.parametrize("extra, fix", [
    ([], "add --e2e"),
    (["--e2e", "--chunk", "256"], "drop --chunk"),
    (["--e2e", "--workload", "captured"], "drop --workload captured"),
], ids=["no-e2e", "chunk", "captured"])
def test_bench_under_torchrun_times_the_first_token_only(rank, capsys, tmp_path, extra, fix):
    code, err = _error(capsys, "bench", "--device", "cpu", "--seq-len", "1k", *extra, "--out", tmp_path / "b")
    assert code == 1 and len(err) == 2, err
    assert "`pbs bench` times the sharded model's first token only" in err[0] and fix in err[0]


def test_model_without_a_tp_plan(rank, capsys, tmp_path):
    from transformers import GPT2Config

    GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    code, err = _error(capsys, "eval", tmp_path / "gpt2", "--device", "cpu", "--out", tmp_path / "ev")
    assert code == 1
    assert err[0] == (f"error: {tmp_path / 'gpt2'}: transformers has no tensor-parallel plan for GPT2, so it "
                      "cannot be split over 2 processes; run `pbs eval` without torchrun")


def test_cpu_on_a_gpu_machine_is_refused(rank, capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, err = _error(capsys, "eval", "--device", "cpu", "--out", tmp_path / "ev")
    assert code == 1 and "CUDA_VISIBLE_DEVICES= torchrun" in err[0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = _error(capsys, "eval", "--device", "cuda", "--out", tmp_path / "ev")
    assert code == 1 and "2 processes on this machine but it has 1 GPU(s); use --nproc_per_node 1" in err[0]


def test_other_ranks_print_nothing_but_their_error(rank, capsys, tmp_path):
    rank(1)
    code, err = _error(capsys, "tune", "--target-speedup", "2x", "--device", "cpu", "--out", tmp_path / "p.yaml")
    assert code == 1 and len(err) == 1 and err[0].startswith("rank 1: error: `pbs tune` does not run under torchrun")
