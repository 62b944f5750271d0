"""The embedded demo model and its corpus: loads the real way, tokenizer round-trips, the corpus
generator is seeded, exact in length, and its answer annotations are right."""

import json

import pytest
import torch

from pbs_kernels import demo


@pytest.fixture(scope="module")
def model_path():
    return demo.demo_model_path()


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def model(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def test_package_data_is_small_and_complete(model_path):
    names = {p.name for p in model_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    size = sum(p.stat().st_size for p in model_path.iterdir())
    assert size < 10 * 2**20, f"demo model folder is {size / 2**20:.1f} MiB; keep it under 10 MiB"


def test_config_is_llama_with_gqa_and_long_positions(model_path):
    cfg = json.loads((model_path / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_attention_heads"] > cfg["num_key_value_heads"]  # grouped-query attention
    from pbs_kernels.limits import HEAD_DIMS

    assert cfg["head_dim"] in HEAD_DIMS  # what the PBS kernels take
    assert cfg["max_position_embeddings"] >= 32768
    assert cfg["vocab_size"] == len(demo.VOCAB)


def test_model_forward_on_short_prompt(model, tokenizer):
    text = demo.demo_text(96, seed=3)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 96)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 96, len(demo.VOCAB))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("n", [2, 17, 1000, 4097])
def test_tokenizer_round_trips_demo_text_with_exact_length(tokenizer, n):
    text = demo.demo_text(n, seed=n)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == n
    assert ids == demo.demo_doc(n, seed=n).ids
    assert ids[0] == tokenizer.bos_token_id
    assert demo.VOCAB.index(demo.UNK) not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_built_tokenizer_matches_shipped_one(tokenizer):
    built = demo.build_demo_tokenizer()
    assert built.get_vocab() == tokenizer.get_vocab()
    text = demo.demo_text(300, seed=9)
    assert built(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_demo_text_is_seeded():
    assert demo.demo_text(2000, seed=5) == demo.demo_text(2000, seed=5)
    assert demo.demo_text(2000, seed=5) != demo.demo_text(2000, seed=6)
    # A shorter text is a prefix of a longer one with the same seed (truncation, not re-drawing).
    assert demo.demo_text(3000, seed=5).startswith(demo.demo_text(2000, seed=5))


def test_demo_text_rejects_too_short():
    with pytest.raises(ValueError, match="n_tokens"):
        demo.demo_text(1)


def test_lookup_annotations_point_at_the_record():
    doc = demo.demo_doc(20000, seed=11)
    put, get = demo.TOKEN_ID["put"], demo.TOKEN_ID["get"]
    firsts = [p for p, k in enumerate(doc.kinds) if k == demo.KIND_KV_FIRST]
    assert len(firsts) > 50
    for p in firsts:
        d = doc.distance[p]
        assert 0 < d < p
        assert doc.ids[p] == doc.ids[p - d]  # same first value token ...
        assert doc.ids[p - 1] == doc.ids[p - d - 1]  # ... after the same key ...
        assert (doc.ids[p - 2], doc.ids[p - d - 2]) == (get, put)  # ... in a query and a record
    # Lookups reach far back: that is what the long-range heads must learn.
    assert max(doc.distance) > 8192


def test_copy_annotations_repeat_an_earlier_span():
    doc = demo.demo_doc(20000, seed=12)
    text = doc.ids
    quote, repeat = demo.TOKEN_ID["quote"], demo.TOKEN_ID["repeat"]
    runs, p = [], 0
    while p < len(text):
        if doc.kinds[p] == demo.KIND_COPY:
            start = p
            while p < len(text) and doc.kinds[p] == demo.KIND_COPY:
                p += 1
            runs.append((start, p))
        p += 1
    assert runs
    for start, end in runs:
        assert text[start - 2] == repeat
        span = [quote] + text[start - 1 : end]
        earlier = text[: start - 2]
        assert any(earlier[i : i + len(span)] == span for i in range(len(earlier) - len(span) + 1))


def test_demo_eval_reports_sane_scores(model, tokenizer):
    result = demo.demo_eval(model, tokenizer, n_tokens=512, n_docs=1, seed=1_000_000)
    assert result.n_tokens == 512
    assert 0.0 < result.loss < 20.0
    for value in (result.kv_acc, result.kv_first_acc):
        assert 0.0 <= value <= 1.0
    assert sum(n for _, n in result.kv_first_by_distance.values()) > 0
    assert json.dumps(result.as_dict())


def test_missing_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "__file__", str(tmp_path / "demo.py"))
    (tmp_path / "demo_model").mkdir()
    with pytest.raises(demo.DemoModelMissing, match="model.safetensors"):
        demo.demo_model_path()
