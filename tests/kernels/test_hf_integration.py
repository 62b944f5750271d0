"""PBS inside transformers models: tiny configs of each family, saved and loaded the real way."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from pbs_kernels.integrations.hf import (
    AttentionCall,
    PbsFallbackWarning,
    PbsIntegrationError,
    StopForward,
    apply_profile,
    capture_attention,
    pbs_profile,
    pbs_stats,
    register,
    remove_profile,
)
from pbs_kernels.profile import LayerConfig, PbsProfile

VOCAB = 256
N = 300  # > segment 64, not a multiple of the block: partial last block and segment
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, vocab_size=VOCAB, max_position_embeddings=1024)


def _config(arch: str, **over):
    import transformers as tf

    kw = {**SMALL, **over}
    if arch == "llama":
        return tf.LlamaConfig(**kw)
    if arch == "qwen2":
        return tf.Qwen2Config(**kw)
    if arch == "qwen3":
        return tf.Qwen3Config(**kw)
    if arch == "mistral":
        return tf.MistralConfig(**{"sliding_window": None, **kw})
    if arch == "gemma":
        return tf.GemmaConfig(**kw)
    if arch == "gemma2":
        return tf.Gemma2Config(**kw)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**{"layer_types": ["full_attention"] * kw["num_hidden_layers"], **kw})
    raise ValueError(arch)


def _saved_model(tmp_path_factory, arch: str, attn: str | None = None, **over):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, **over))
    folder = tmp_path_factory.mktemp(arch)
    model.save_pretrained(folder)
    extra = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def _profile(threshold=1.0, block=16, segment=64, **layers):
    p = PbsProfile(defaults=LayerConfig(block_size=block, segment_size=segment, threshold=threshold, min_seq_len=0))
    for idx, over in layers.items():
        p.layers[int(idx.lstrip("L"))] = over
    return p


def _ids(n=N, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3"]


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tmp_path_factory):
    return _saved_model(tmp_path_factory, request.param)


def test_threshold_one_equals_dense(family):
    ids = _ids()
    ref = _logits(family, ids)
    before = family.config._attn_implementation
    apply_profile(family, _profile(1.0), collect_stats=True)
    try:
        assert family.config._attn_implementation == "pbs"
        out = _logits(family, ids)
        stats = pbs_stats(family)
    finally:
        remove_profile(family)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert sorted(stats) == [0, 1]
    assert all(not s.dense and s.reason is None and s.q_len == N for s in stats.values())
    assert family.config._attn_implementation == before


def test_low_threshold_differs_but_finite(family):
    ids = _ids()
    ref = _logits(family, ids)
    with pbs_profile(family, _profile(0.5), collect_stats=True):
        out = _logits(family, ids)
        densities = [s.density for s in pbs_stats(family).values()]
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert all(d < 1.0 for d in densities)
    torch.testing.assert_close(_logits(family, ids), ref)  # the context manager undid it


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _saved_model(tmp_path_factory, "llama")


def test_decode_after_pbs_prefill_matches_dense(llama):
    ids = _ids(n=200)
    with torch.no_grad():
        ref = llama.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        with pbs_profile(llama, _profile(1.0), collect_stats=True):
            out = llama.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            last = pbs_stats(llama)
    assert torch.equal(out, ref)
    assert last[0].reason == "decode" and last[0].q_len == 1  # the last call was a decode step


def test_decode_after_sparse_prefill_runs(llama):
    with torch.no_grad(), pbs_profile(llama, _profile(0.5)):
        out = llama.generate(_ids(n=200), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 203)


def test_per_layer_settings(llama):
    ids = _ids()
    prof = _profile(0.5, L1={"dense": True})
    with pbs_profile(llama, prof, collect_stats=True):
        _logits(llama, ids)
        stats = pbs_stats(llama)
    assert not stats[0].dense and stats[0].density < 1.0
    assert stats[1].dense and stats[1].reason == "dense layer"

    prof = _profile(0.5, L0={"min_seq_len": N + 1})
    with pbs_profile(llama, prof, collect_stats=True):
        _logits(llama, ids)
        stats = pbs_stats(llama)
    assert stats[0].reason == "short prompt" and not stats[1].dense


def test_default_profile_keeps_short_prompts_dense(llama):
    ids = _ids()
    ref = _logits(llama, ids)
    with pbs_profile(llama, None, collect_stats=True):  # min_seq_len 16K
        out = _logits(llama, ids)
        assert {s.reason for s in pbs_stats(llama).values()} == {"short prompt"}
    torch.testing.assert_close(out, ref)


def test_remove_profile_restores(llama):
    ids = _ids()
    ref = _logits(llama, ids)
    apply_profile(llama, _profile(0.5))
    apply_profile(llama, _profile(0.6))  # re-applying keeps the original implementation to restore
    assert not torch.allclose(_logits(llama, ids), ref)
    remove_profile(llama)
    assert llama.config._attn_implementation == "sdpa"
    assert not hasattr(llama, "_pbs_state")
    assert not any(hasattr(m, "_pbs_state") for m in llama.modules())
    torch.testing.assert_close(_logits(llama, ids), ref)
    remove_profile(llama)  # a second undo is a no-op


def test_nested_context_restores_outer_profile(llama):
    outer = _profile(0.5)
    apply_profile(llama, outer)
    try:
        with pbs_profile(llama, _profile(1.0)):
            assert llama._pbs_state.profile.defaults.threshold == 1.0
        assert llama._pbs_state.profile is outer
        assert llama.config._attn_implementation == "pbs"
    finally:
        remove_profile(llama)


def test_profile_from_path_and_wrong_model(llama, tmp_path):
    path = _profile(1.0).save(tmp_path / "p.yaml")
    with pbs_profile(llama, path):
        assert llama._pbs_state.profile.defaults.block_size == 16
    with pytest.raises(PbsIntegrationError, match="layer 7 but LlamaForCausalLM has 2 layers"):
        apply_profile(llama, _profile(1.0, L7={"dense": True}))
    assert llama.config._attn_implementation == "sdpa"


def test_padding_runs_pbs_on_the_unpadded_rows(llama):
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0  # left padding on the second row
    ref = _logits(llama, ids, attention_mask=mask)
    with pbs_profile(llama, _profile(1.0), collect_stats=True):
        out = _logits(llama, ids, attention_mask=mask)
        assert all(not s.dense and s.sequences == 2 for s in pbs_stats(llama).values())
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, 40:], ref[1, 40:], rtol=1e-4, atol=1e-4)


def test_head_rule_cuts_each_prompt_of_a_batch_alone(llama):
    # threshold_mass "head" has one cut per sequence and head: a prompt's output in a padded batch
    # is what it gets alone, whatever the other prompt holds.
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    prof = _profile(0.6)
    prof.defaults = LayerConfig(**{**prof.defaults.__dict__, "threshold_mass": "head"})
    with pbs_profile(llama, prof, collect_stats=True):
        both = _logits(llama, ids, attention_mask=mask)
        assert all(s.density < 1.0 and s.sequences == 2 for s in pbs_stats(llama).values())
        alone = _logits(llama, ids[:1])
    torch.testing.assert_close(both[0], alone[0], rtol=1e-4, atol=1e-4)


def test_loading_with_pbs_implementation(tmp_path):
    register()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama")).save_pretrained(tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    pbs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="pbs").eval()
    ids = _ids()
    torch.testing.assert_close(_logits(pbs, ids), _logits(dense, ids))  # default profile: dense below 16K


def _one_fallback_warning(model, ids, match):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _logits(model, ids)
        _logits(model, ids)
    ours = [w for w in caught if issubclass(w.category, PbsFallbackWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert match in str(ours[0].message)


def test_gemma2_softcap_runs_pbs(tmp_path_factory):
    # Soft-capping 50 on every layer. Eager is the implementation that applies it (transformers
    # 5.17 defaults Gemma2 to sdpa, which ignores it), so it is the reference.
    model = _saved_model(tmp_path_factory, "gemma2", attn="eager")
    ids = _ids()
    ref = _logits(model, ids)
    with pbs_profile(model, _profile(1.0), collect_stats=True):
        out = _logits(model, ids)
        assert all(not s.dense and s.reason is None for s in pbs_stats(model).values())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert model.config._attn_implementation == "eager"


def test_sliding_window_shorter_than_prompt_runs_pbs(tmp_path_factory):
    model = _saved_model(tmp_path_factory, "mistral", sliding_window=128)
    ids = _ids()
    ref = _logits(model, ids)
    with pbs_profile(model, _profile(1.0), collect_stats=True):
        out = _logits(model, ids)
        assert all(not s.dense and s.reason is None for s in pbs_stats(model).values())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_unsupported_head_dim_falls_back(tmp_path_factory):
    model = _saved_model(tmp_path_factory, "llama", head_dim=32, num_attention_heads=4, num_key_value_heads=2)
    ids = _ids()
    ref = _logits(model, ids)
    with pbs_profile(model, _profile(0.5)):
        _one_fallback_warning(model, ids, "head dim 32")
        out = _logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_triton_backend_interpreter(llama):
    ids = _ids(n=100)
    ref = _logits(llama, ids)
    with pbs_profile(llama, _profile(1.0, block=16, segment=32), backend="triton", collect_stats=True):
        out = _logits(llama, ids)
        assert not pbs_stats(llama)[0].dense
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_architecture_without_attention_interface(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tf.BloomConfig(hidden_size=64, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(PbsIntegrationError, match="AttentionInterface"):
        apply_profile(model, _profile())
    assert not hasattr(model, "_pbs_state")


def test_capture_sees_post_rope_qk_and_stops(llama):
    ids = _ids()
    ref = _logits(llama, ids)
    seen: list[AttentionCall] = []

    def on_layer(call):
        seen.append(call)
        return None

    with torch.no_grad(), capture_attention(llama, on_layer) as cap:
        out = llama(input_ids=ids).logits
    assert cap.calls == 2 and [c.layer_idx for c in seen] == [0, 1]
    q = seen[0].query
    assert q.shape == (1, 2, N, 64) and seen[0].key.shape == (1, 1, N, 64)
    assert seen[0].scaling == pytest.approx(64 ** -0.5)
    torch.testing.assert_close(out, ref)  # dense attention when the callback returns None
    assert llama.config._attn_implementation == "sdpa"

    calls = []

    def stop(call):
        calls.append(call.layer_idx)
        raise StopForward

    with torch.no_grad(), capture_attention(llama, stop, layers=[1]):
        with pytest.raises(StopForward):
            llama(input_ids=ids)
    assert calls == [1]
