"""The capture hook the toolkit's analysis and tuning use: each attention layer's post-RoPE Q, K
and V handed to a callback during a normal forward pass, through the "pbs_capture" attention
function. A layer the callback does not answer runs the "pbs" forward's exact dense path, and
`AttentionCall.fallback_reason` asks the forward's own rule, so the toolkit and the runtime never
disagree about which layers PBS can run.

`register()` lives here because it adds both attention functions and `capture_attention` needs it;
apply.py, above this module, uses it too.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from ._common import (
    ATTN_NAME,
    CAPTURE_NAME,
    _CAPTURE_ATTR,
    _current_impl,
    _register,
    _require_attention_layers,
    _select,
)
from .forward import _dense, _unsupported, pbs_attention_forward


class StopForward(Exception):
    """Raise it from a `capture_attention` callback to end the forward pass early (after the last
    layer of interest); catch it around the model call."""


@dataclass
class AttentionCall:
    """One attention layer's inputs, as the model hands them to its attention function.

    query: [B, HQ, N, D] and key/value: [B, H, KV, D], positions already applied (post-RoPE).
    scaling: the softmax scale the model uses (Gemma's is not 1/sqrt(D)).
    softcap, sliding_window: what the module passes, None when it does not use them.
    """

    layer_idx: int | None
    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float
    softcap: float | None = None
    sliding_window: int | None = None
    sinks: Any = None

    def fallback_reason(self) -> str | None:
        """Why the "pbs" attention function would run this layer dense whatever the profile
        (e.g. "softcap 30", "sliding window 4096", "head dim 96"), or None when PBS can run it."""
        found = _unsupported(self.query, self.key, self.value,
                             {"softcap": self.softcap, "sliding_window": self.sliding_window, "sinks": self.sinks})
        return None if found is None else found[1]


@dataclass
class _Capture:
    on_layer: Callable[[AttentionCall], torch.Tensor | None]
    layers: frozenset[int] | None
    calls: int = 0  # callback invocations; 0 after a forward means attention bypassed the interface
    seen: int = 0  # attention calls through the capture function, selected or not


def _capture_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    cap: _Capture | None = getattr(module, _CAPTURE_ATTR, None)
    layer_idx = getattr(module, "layer_idx", None)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    out = None
    if cap is not None:
        cap.seen += 1
        if cap.layers is None or layer_idx in cap.layers:
            cap.calls += 1
            out = cap.on_layer(AttentionCall(
                layer_idx, module, query, key, value, attention_mask, scaling,
                kwargs.get("softcap"), kwargs.get("sliding_window"),
                kwargs.get("s_aux", kwargs.get("sinks")),
            ))
    if out is not None:
        return out.transpose(1, 2).contiguous(), None
    return _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)


def register() -> None:
    """Register "pbs" (and "pbs_capture") with transformers' attention and mask interfaces.
    Idempotent. After it, `from_pretrained(..., attn_implementation="pbs")` also works (with the
    default profile until `apply_profile` binds another)."""
    _register(ATTN_NAME, pbs_attention_forward)
    _register(CAPTURE_NAME, _capture_forward)


@contextmanager
def capture_attention(model, on_layer: Callable[[AttentionCall], torch.Tensor | None], *,
                      layers: Iterable[int] | None = None) -> Iterator[_Capture]:
    """Inside the block, each forward pass of `model` calls `on_layer(call)` for every attention
    layer in `layers` (all when None), in layer order. The callback may return the layer's output
    [B, HQ, N, D] to use instead of dense attention (None: exact dense attention), and may raise
    `StopForward` to end the pass early. Yields a handle whose `calls` counts callback invocations.
    The model's previous attention implementation is restored on exit.
    """
    register()
    modules = _require_attention_layers(model)
    previous = _current_impl(model)
    cap = _Capture(on_layer, None if layers is None else frozenset(int(i) for i in layers))
    _select(model, CAPTURE_NAME)
    for m in modules:
        setattr(m, _CAPTURE_ATTR, cap)
    try:
        yield cap
    finally:
        for m in modules:
            if getattr(m, _CAPTURE_ATTR, None) is cap:
                delattr(m, _CAPTURE_ATTR)
        _select(model, previous, check=False)
