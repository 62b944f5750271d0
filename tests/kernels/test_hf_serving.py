"""Serving-shaped prefill through transformers: left-padded batches, chunked prefill against the
KV cache, packed sequences and sliding-window / sink layers run PBS, and at threshold 1.0 give
dense attention's tokens. Tiny models saved with save_pretrained and loaded the real way."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from pbs_kernels.integrations.hf import pbs_profile, pbs_stats
from pbs_kernels.profile import LayerConfig, PbsProfile

VOCAB = 256
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, vocab_size=VOCAB, max_position_embeddings=2048)
WINDOW = 100  # shorter than the 300-token prompts


def _config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**SMALL)
    if arch == "qwen2":
        return tf.Qwen2Config(**SMALL)
    if arch == "qwen3":
        return tf.Qwen3Config(**SMALL)
    if arch == "mistral":
        return tf.MistralConfig(**SMALL, sliding_window=WINDOW)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**SMALL, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    if arch == "gpt_oss":
        if not hasattr(tf, "GptOssConfig"):
            pytest.skip("this transformers has no gpt-oss")
        return tf.GptOssConfig(**SMALL, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                               layer_types=["sliding_attention", "full_attention"])
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "gpt_oss"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = _config(request.param)
    m = AutoModelForCausalLM.from_config(cfg)
    if request.param == "gpt_oss":
        with torch.no_grad():  # non-trivial sinks, so a wrong sink term shows
            for layer in m.model.layers:
                layer.self_attn.sinks.normal_(0, 1)
    folder = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(folder)
    # gpt-oss has no SDPA attention; eager is its reference
    attn = "eager" if request.param == "gpt_oss" else None
    extra = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def _profile(threshold=1.0):
    return PbsProfile(defaults=LayerConfig(block_size=16, segment_size=64, threshold=threshold, min_seq_len=0))


def _ids(n, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, n), generator=g)


def _ran_pbs(stats):
    assert stats, "no statistics were collected"
    for idx, s in stats.items():
        assert not s.dense and s.reason is None, f"layer {idx} ran dense: {s.reason}"


def test_left_padded_batch(model):
    ids = _ids(300, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :70] = 0  # left padding: the second prompt has 230 tokens
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        with pbs_profile(model, _profile(1.0), collect_stats=True):
            out = model(input_ids=ids, attention_mask=mask).logits
            stats = pbs_stats(model)
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    _ran_pbs(stats)
    assert all(s.sequences == 2 for s in stats.values())
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, 70:], ref[1, 70:], rtol=1e-4, atol=1e-4)
    assert torch.equal(gen, ref_gen)


def test_chunked_prefill(model):
    from transformers import DynamicCache

    ids = _ids(300)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ref_gen = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        with pbs_profile(model, _profile(1.0), collect_stats=True):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :170], past_key_values=cache, use_cache=True)
            out = model(input_ids=ids[:, 170:], past_key_values=cache, use_cache=True).logits
            stats = pbs_stats(model)  # the second chunk: 130 queries against 300 keys
            gen = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, prefill_chunk_size=128)
    _ran_pbs(stats)
    assert {(s.q_len, s.kv_len) for s in stats.values()} <= {(130, 300), (130, WINDOW + 129)}
    torch.testing.assert_close(out, ref[:, 170:], rtol=1e-4, atol=1e-4)
    assert torch.equal(gen, ref_gen)


def test_packed_sequences_by_position_ids(model):
    if model.config.model_type == "gpt_oss":
        pytest.skip("gpt-oss builds its masks without position_ids: transformers does not pack it, dense or not")
    a, b = _ids(300, seed=2), _ids(180, seed=3)
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(300), torch.arange(180)])[None]
    with torch.no_grad():
        ref_a, ref_b = model(input_ids=a).logits, model(input_ids=b).logits
        with pbs_profile(model, _profile(1.0), collect_stats=True):
            out = model(input_ids=packed, position_ids=pos, use_cache=False).logits  # no cache: packing is read
            stats = pbs_stats(model)
    _ran_pbs(stats)
    assert all(s.sequences == 2 for s in stats.values())
    torch.testing.assert_close(out[:, :300], ref_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 300:], ref_b, rtol=1e-4, atol=1e-4)


def test_sparse_threshold_runs_and_stays_close(model):
    ids = _ids(300)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with pbs_profile(model, _profile(0.7), collect_stats=True):
            out = model(input_ids=ids).logits
            stats = pbs_stats(model)
    _ran_pbs(stats)
    assert torch.isfinite(out).all()
    assert all(s.density < 1.0 for s in stats.values())
    assert ((out - ref).norm() / ref.norm()) < 0.5


def test_packed_sequences_by_cu_seq_lens_kwargs(tmp_path):
    """Flash-style packing kwargs (what DataCollatorWithFlattening hands over) go to varlen."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama")).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    a, b = _ids(300, seed=4), _ids(120, seed=5)
    cu = torch.tensor([0, 300, 420], dtype=torch.int32)
    kw = dict(position_ids=torch.cat([torch.arange(300), torch.arange(120)])[None], use_cache=False,
              cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=300, max_length_k=300)
    with torch.no_grad():
        ref_a, ref_b = model(input_ids=a).logits, model(input_ids=b).logits
        with pbs_profile(model, _profile(1.0), collect_stats=True):
            out = model(input_ids=torch.cat([a, b], dim=1), **kw).logits
            stats = pbs_stats(model)
    _ran_pbs(stats)
    assert all(s.sequences == 2 for s in stats.values())
    torch.testing.assert_close(out[:, :300], ref_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 300:], ref_b, rtol=1e-4, atol=1e-4)


def test_custom_mask_runs_dense_with_one_warning(tmp_path):
    import warnings

    from pbs_kernels.integrations.hf import PbsFallbackWarning, pbs_attention_forward

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama")).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    q, k, v = torch.randn(1, 2, 200, 64), torch.randn(1, 1, 200, 64), torch.randn(1, 1, 200, 64)
    mask = torch.ones(200, 200, dtype=torch.bool).tril()
    mask[150:, 10:20] = False  # a hole: not causal over a contiguous run of keys
    mask = mask[None, None]
    with pbs_profile(model, _profile(1.0), collect_stats=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attn = model.model.layers[0].self_attn
        for _ in range(2):
            out, _ = pbs_attention_forward(attn, q, k, v, mask, scaling=0.125)
        stats = pbs_stats(model)
    ours = [w for w in caught if issubclass(w.category, PbsFallbackWarning)]
    assert len(ours) == 1 and "not causal over contiguous runs" in str(ours[0].message)
    assert stats[0].reason == "attention mask"
    s = (q @ k.transpose(-1, -2)) * 0.125
    want = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-4, atol=1e-4)
