"""PbsSettings: one value for a layer's knobs (pbs_kernels.settings). It checks itself with the
runtime's messages, is what a profile layer turns into, and the layers below it stay apart."""
import ast
import dataclasses
import pathlib

import pytest
import torch

from pbs_kernels import LayerConfig, PbsSettings, pbs_attention, pbs_attention_varlen
from pbs_kernels.settings import LAYER_FIELDS

from _ref import rand_qkv

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "kernels" / "pbs_kernels"

BAD = [
    pytest.param(dict(block_size=48), id="block_size"),
    pytest.param(dict(block_size=True), id="block_size-bool"),
    pytest.param(dict(block_size=64, segment_size=96), id="segment_size"),
    pytest.param(dict(threshold=0.0), id="threshold-0"),
    pytest.param(dict(threshold=float("nan")), id="threshold-nan"),
    pytest.param(dict(backend="cuda"), id="backend"),
    pytest.param(dict(min_seq_len=-1), id="min_seq_len"),
    pytest.param(dict(min_seq_len="16k"), id="min_seq_len-str"),
    pytest.param(dict(estimator="max"), id="estimator"),
    pytest.param(dict(threshold_mass="own"), id="threshold_mass"),
    pytest.param(dict(window=0), id="window"),
    pytest.param(dict(window=True), id="window-bool"),
    pytest.param(dict(softcap=-1.0), id="softcap"),
    pytest.param(dict(block_size=32, vertical_keys=33), id="vertical_keys"),
    pytest.param(dict(vertical_keys=1.5), id="vertical_keys-float"),
]


@pytest.mark.parametrize("bad", BAD)
def test_settings_raise_the_runtime_messages(bad):
    # The same one-line ValueError from the type, from pbs_attention and from the packed varlen call.
    with pytest.raises(ValueError) as own:
        PbsSettings(**bad)
    q, k, v = rand_qkv(1, 2, 1, 300, 64)
    with pytest.raises(ValueError) as call:
        pbs_attention(q, k, v, **bad)
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    cu = torch.tensor([0, 100, 300])
    with pytest.raises(ValueError) as packed:
        pbs_attention_varlen(qp, kp, vp, cu, cu, 200, 200, packed=True, **bad)
    assert str(own.value) == str(call.value) == str(packed.value)
    assert str(own.value).startswith("pbs_attention: ") and "\n" not in str(own.value)
    assert next(iter(bad)) in str(own.value)


def test_settings_are_frozen_hashable_values():
    a = PbsSettings(threshold=1, softcap=30, scale=1)
    assert (a.threshold, a.softcap, a.scale) == (1.0, 30.0, 1.0)
    assert all(type(x) is float for x in (a.threshold, a.softcap, a.scale))
    b = PbsSettings(threshold=1.0, softcap=30.0, scale=1.0)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.replace(threshold=0.5) != a and a.replace(threshold=0.5).threshold == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.threshold = 0.5
    with pytest.raises(ValueError, match="threshold"):
        a.replace(threshold=2.0)
    assert a.values() == tuple(getattr(a, f.name) for f in dataclasses.fields(a))
    assert PbsSettings(**a.kwargs()) == a


def test_layer_config_makes_the_settings():
    cfg = LayerConfig(block_size=64, segment_size=128, threshold=0.8, permute=False, min_seq_len=0,
                      estimator="top", threshold_mass="total", vertical_keys=2)
    s = cfg.settings(window=500, softcap=30.0, scale=0.1, backend="torch")
    assert s.layer_kwargs() == cfg.plan_kwargs() and tuple(cfg.plan_kwargs()) == LAYER_FIELDS
    assert (s.min_seq_len, s.window, s.softcap, s.scale, s.backend) == (0, 500, 30.0, 0.1, "torch")
    assert LayerConfig(min_seq_len="auto").settings().min_seq_len == "auto"
    # The profile's keywords and the settings give pbs_attention the same call.
    q, k, v = rand_qkv(1, 2, 1, 400, 64, seed=3)
    want = pbs_attention(q, k, v, **cfg.plan_kwargs(), min_seq_len=0, backend="torch", window=500)
    got = pbs_attention(q, k, v, **cfg.settings(backend="torch", window=500).kwargs())
    assert torch.equal(got, want)


def _imports(path: pathlib.Path) -> list[str]:
    """Modules a file imports, as dotted paths relative to pbs_kernels (level-resolved)."""
    pkg = path.relative_to(KERNELS).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(pkg[:len(pkg) - node.level + 1])
            mod = base + (node.module.split(".") if node.module else [])
            out += [".".join(mod + [a.name]) for a in node.names] if not node.module else [".".join(mod)]
    return out


def test_layers_stay_apart():
    # Geometry imports nothing from the ops; attention.py imports op packages, never a file in one.
    for name in ("blocks.py", "packing.py", "settings.py", "_host.py", "limits.py"):
        assert not [m for m in _imports(KERNELS / name) if m.startswith("ops")], name
    below = [m for m in _imports(KERNELS / "attention.py") if m.startswith("ops.") and m.count(".") > 1]
    assert below == [], below
