"""Models whose head dims PBS used to refuse: tiny Gemma 2 (256, soft-capping, sliding windows),
Gemma 3 (256, sliding and full layers) and Phi-3 (96) built from a config, saved and loaded the
real way; through `apply_profile` at threshold 1.0 every layer runs PBS and equals dense."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from pbs_kernels.integrations.hf import apply_profile, pbs_profile, pbs_stats, remove_profile
from pbs_kernels.profile import LayerConfig, PbsProfile

VOCAB = 256
N = 300
WINDOW = 100  # shorter than the prompt, so the window layers are windowed


def _config(arch: str):
    import transformers as tf

    base = dict(intermediate_size=256, num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=1024)
    if arch == "gemma2":
        # head dim 256, soft-capping 50 and alternating window / full layers, as the family has
        return tf.Gemma2Config(**base, hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
                               head_dim=256, sliding_window=WINDOW, query_pre_attn_scalar=256)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**base, hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
                                   head_dim=256, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"])
    if arch == "phi3":
        # Phi-3's head dim is hidden_size / heads: 192 / 2 = 96
        return tf.Phi3Config(**base, hidden_size=192, num_attention_heads=2, num_key_value_heads=2,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise ValueError(arch)


def _saved(tmp_path_factory, arch):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(arch)
    AutoModelForCausalLM.from_config(_config(arch)).save_pretrained(folder)
    # eager applies Gemma 2's soft-capping (sdpa ignores it), so it is the reference there
    extra = {"attn_implementation": "eager"} if arch == "gemma2" else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def _profile(threshold=1.0):
    return PbsProfile(defaults=LayerConfig(block_size=16, segment_size=64, threshold=threshold, min_seq_len=0))


@pytest.mark.parametrize("arch,head_dim", [("gemma2", 256), ("gemma3", 256), ("phi3", 96)])
def test_threshold_one_equals_dense(tmp_path_factory, arch, head_dim):
    model = _saved(tmp_path_factory, arch)
    assert model.model.layers[0].self_attn.head_dim == head_dim
    ids = torch.randint(1, VOCAB, (1, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with pbs_profile(model, _profile(1.0), collect_stats=True):
            out = model(input_ids=ids).logits
            stats = pbs_stats(model)
        with pbs_profile(model, _profile(0.3), collect_stats=True):
            sparse = model(input_ids=ids).logits
            densities = [s.density for s in pbs_stats(model).values()]
    assert sorted(stats) == [0, 1]
    for idx, s in stats.items():
        assert not s.dense and s.reason is None, f"layer {idx} ran dense: {s.reason}"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(sparse).all() and min(densities) < 1.0


def test_phi3_triton_interpreter(tmp_path_factory):
    model = _saved(tmp_path_factory, "phi3")
    ids = torch.randint(1, VOCAB, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        apply_profile(model, _profile(1.0), backend="triton", collect_stats=True)
        try:
            out = model(input_ids=ids).logits
            assert all(not s.dense for s in pbs_stats(model).values())
        finally:
            remove_profile(model)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
