"""apply/remove: resolve a profile, bind it to a model's attention modules and select the "pbs"
attention function; undo it; read the statistics of the last forward.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

from ...graphs import check_graph_mode
from ...limits import BACKENDS
from ...profile import PbsProfile
from ._common import (
    ATTN_NAME,
    _STATE_ATTR,
    PbsIntegrationError,
    _current_impl,
    _require_attention_layers,
    _select,
    attention_layers,
)
from .capture import register
from .forward import LayerStats, _State


def _as_profile(profile) -> PbsProfile:
    if profile is None:
        return PbsProfile.default()
    if isinstance(profile, PbsProfile):
        return profile
    if isinstance(profile, (str, os.PathLike)):
        return PbsProfile.load(profile)
    raise TypeError(f"profile must be a PbsProfile, a path or None, not {type(profile).__name__}")


def _bind(model, modules, state: _State) -> None:
    for m in modules:
        setattr(m, _STATE_ATTR, state)
    # A plain attribute (not a submodule or buffer): nn.Module stores it in __dict__.
    model._pbs_state = state


def _unbind(model, modules) -> None:
    for m in modules:
        if hasattr(m, _STATE_ATTR):
            delattr(m, _STATE_ATTR)
    if hasattr(model, _STATE_ATTR):
        delattr(model, _STATE_ATTR)


def apply_profile(model, profile: PbsProfile | str | os.PathLike | None = None, *, backend: str = "auto",
                  collect_stats: bool = False, graph: bool | str = "auto"):
    """Make `model` use PBS attention with per-layer settings from `profile`.

    profile: a PbsProfile, a path to a profile YAML, or None for `PbsProfile.default()` (whose
    min_seq_len keeps prompts under 16K tokens dense). backend: "auto" (Triton on CUDA, torch on
    CPU), "triton" or "torch". collect_stats: record each layer's density in the last forward,
    read with `pbs_stats(model)` (off: no extra work). graph: pbs_attention's CUDA-graph mode for
    prefill calls ("auto": a shape and setting seen twice is captured and replayed when the call
    is small enough for the host to dominate; False: eager). Applying again replaces the profile;
    `remove_profile` restores the attention the model had before the first apply.

    Raises PbsIntegrationError (one line) when the model has no attention layers PBS can drive,
    ProfileError for a bad profile file. Returns the model.
    """
    if backend not in BACKENDS:
        raise ValueError(f"apply_profile: backend {backend!r} is not one of {BACKENDS}")
    profile = _as_profile(profile)
    modules = _require_attention_layers(model)
    n_layers = max(m.layer_idx for m in modules) + 1
    extra = sorted(i for i in profile.layers if i >= n_layers)
    if extra:
        raise PbsIntegrationError(
            f"the profile sets layer {extra[0]} but {type(model).__name__} has {n_layers} layers "
            f"(0-{n_layers - 1}); was the profile made for another model ({profile.model or 'unknown'})?"
        )
    register()
    old: _State | None = getattr(model, _STATE_ATTR, None)
    previous = old.previous if old is not None else _current_impl(model)
    check_graph_mode("apply_profile", graph)
    state = _State(profile, previous, backend=backend, collect_stats=collect_stats, graph=graph)
    _select(model, ATTN_NAME)
    _bind(model, modules, state)
    return model


def remove_profile(model):
    """Undo `apply_profile`: restore the previous attention implementation. No-op without one."""
    state: _State | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    _select(model, state.previous, check=False)
    _unbind(model, attention_layers(model))
    return model


@contextmanager
def pbs_profile(model, profile: PbsProfile | str | os.PathLike | None = None, **kwargs):
    """`with pbs_profile(model, profile): ...` applies the profile for the block only; a profile
    applied before the block is back in force after it."""
    old: _State | None = getattr(model, _STATE_ATTR, None)
    apply_profile(model, profile, **kwargs)
    try:
        yield model
    finally:
        if old is None:
            remove_profile(model)
        else:
            _select(model, ATTN_NAME, check=False)
            _bind(model, attention_layers(model), old)


def pbs_stats(model) -> dict[Any, LayerStats]:
    """Per-layer statistics of the last forward (layer_idx -> LayerStats); empty unless the
    profile was applied with collect_stats=True."""
    state: _State | None = getattr(model, _STATE_ATTR, None)
    return dict(state.last_stats) if state is not None else {}

