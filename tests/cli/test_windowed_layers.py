"""analyze and tune see a layer as the model runs it: a Gemma-3-shaped model (head dim 256, a
sliding-window layer and a full one) is analysed with its window layer inside the window and
reported as windowed, both layers run PBS, and tune offers the window layer its exact windowed
attention, writing why into the profile and the report."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from pbs_cli.commands.analyze import _pbs_cell
from pbs_cli.workflows.analyze import run_analysis
from pbs_cli.workflows.tune.study import SearchSpace
from pbs_cli.workflows.tune.workflow import TuneSettings, _windowed_option, run_tune
from pbs_kernels.blocks import window_density
from pbs_kernels.profile import PbsProfile
from pbs_kernels.settings import PbsSettings

VOCAB = 256
WINDOW = 64


def _gemma3(tmp_path_factory, head_dim=256):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=head_dim, vocab_size=VOCAB,
                              max_position_embeddings=2048, sliding_window=WINDOW,
                              layer_types=["sliding_attention", "full_attention"])
    folder = tmp_path_factory.mktemp(f"gemma3_d{head_dim}")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(n, seed=1):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_window_density_counts_the_tiles_a_window_meets():
    assert window_density(300, 16, None) == 1.0
    assert window_density(300, 16, 10_000) == 1.0  # a window longer than the prompt is no window
    # brute force: tile (i, j) meets the window when some row of block i sees some key of block j
    for n, b, w in ((300, 16, 64), (257, 32, 33), (1000, 64, 1)):
        nb = -(-n // b)
        hit = sum(1 for i in range(nb) for j in range(i + 1)
                  if any(q - w < k <= q for q in range(i * b, min(n, (i + 1) * b)) for k in range(j * b, min(n, (j + 1) * b))))
        assert window_density(n, b, w) == pytest.approx(hit / (nb * (nb + 1) / 2)), (n, b, w)


def test_analyze_reports_window_layers_as_windowed(tmp_path_factory):
    model = _gemma3(tmp_path_factory)
    N = 300
    report = run_analysis(model, _ids(N), PbsSettings(block_size=16, segment_size=64, threshold=0.9))
    win, full = report.layers
    assert report.head_dim == 256
    assert win.pbs_fallback is None and full.pbs_fallback is None  # head dim 256 and the window: PBS runs
    assert (win.attention, win.sliding_window) == ("windowed", WINDOW)
    assert (full.attention, full.sliding_window, full.window_density) == ("full", None, 1.0)
    assert win.window_density == pytest.approx(window_density(N, 16, WINDOW)) and win.window_density < 0.5
    # Inside its window: neither the oracle nor PBS's selection needs a tile the window does not meet.
    assert win.oracle_density <= win.window_density + 1e-6
    # (keys in original order: permuting moves keys across the window's edge inside a segment,
    # which spreads the window over more slot blocks)
    assert max(h.pbs_density_noperm for h in win.heads) <= win.window_density + 1e-6
    full_heads = max(h.pbs_density_noperm for h in full.heads)
    assert full_heads > win.window_density  # the full layer at threshold 0.9 keeps more than the window
    assert report.summary["windowed_layers"] == [0]
    assert [_pbs_cell(lr) for lr in report.layers] == [f"window {WINDOW}", "yes"]
    assert report.to_dict()["layers"][0]["attention"] == "windowed"


def test_windowed_option_skips_pbs_when_the_window_is_cheaper():
    # 512-token window at 128K: its tiles are ~1% of the causal ones, below PBS's fixed cost.
    space = SearchSpace.for_length(131072)
    cap = type("Cap", (), {"window": 512})()
    point, floor = _windowed_option(space, cap, 131072)
    assert point["windowed"] and point["error"] == 0.0 and point["predicted_cost"] <= floor
    assert point["config"]["threshold"] == 1.0 and point["config"]["permute"] is False
    # At 8K the same window is a sixth of the tiles: PBS may beat it, so the study runs.
    point, floor = _windowed_option(SearchSpace.for_length(8192), cap, 8192)
    assert point["predicted_cost"] > floor


def test_tune_offers_the_window_layer_its_window(tmp_path_factory, tmp_path):
    model = _gemma3(tmp_path_factory, head_dim=64)
    N = 1024
    settings = TuneSettings(target_speedup=1.2, out=tmp_path / "g3.yaml", trials=3, max_accuracy_drop=None,
                            model_name="tiny-gemma3")
    result = run_tune(model, _ids(N), _ids(N, seed=2), settings)
    win, full = result.layers
    assert win.window == WINDOW and full.window is None
    windowed = [p for p in win.front if p.get("windowed")]
    assert len(windowed) == 1 and windowed[0]["error"] == 0.0
    assert windowed[0]["density"] == pytest.approx(window_density(N, max(SearchSpace.for_length(N).block_sizes),
                                                                  WINDOW))
    assert not any(p.get("windowed") for p in full.front) and full.reason is None
    # Error 0 at ~0.4 of dense: the least-error way to 1.2x is the window layer's exact window
    # (and the full layer dense), whatever the full layer's trials found.
    assert win.chosen.get("windowed") and win.chosen["cost"] < 0.6
    assert win.reason.startswith(f"window {WINDOW}: exact attention over its tiles")
    profile = result.profile
    assert profile.reason(0) == win.reason and profile.reason(1) is None
    cfg = profile.layer(0)
    assert cfg.threshold == 1.0 and not cfg.permute and not cfg.dense
    # The profile round-trips with its reason; the window layer runs PBS's kernel on its window.
    profile.save(tmp_path / "again.yaml")
    again = PbsProfile.load(tmp_path / "again.yaml")
    assert again.reason(0) == profile.reason(0) and again.layer(0) == profile.layer(0)
    assert "reason:" in (tmp_path / "again.yaml").read_text()
    from pbs_kernels.integrations.hf import pbs_profile, pbs_stats

    ids = _ids(N, seed=3)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        with pbs_profile(model, again, collect_stats=True):
            out = model(input_ids=ids, use_cache=False).logits
            stats = pbs_stats(model)
    assert not stats[0].dense and stats[0].density < 0.6
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # exact inside the window


def test_profile_reason_is_text_not_a_setting(tmp_path):
    from pbs_kernels.profile import ProfileError

    good = tmp_path / "p.yaml"
    good.write_text("schema_version: 1\nlayers:\n  2: {threshold: 1.0, permute: false, reason: 'window 512: why'}\n")
    p = PbsProfile.load(good)
    assert p.reason(2) == "window 512: why" and p.reason(0) is None
    assert p.layer(2).threshold == 1.0 and not p.layer(2).permute
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nlayers:\n  0: {reason: 3}\n")
    with pytest.raises(ProfileError, match=r"layers\.0\.reason = 3 has type int; expected a string"):
        PbsProfile.load(bad)
