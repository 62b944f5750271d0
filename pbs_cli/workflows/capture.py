"""The one capture of a prefill: a model's post-RoPE attention inputs, for any subset of layers.

    def on_layer(layer: CapturedLayer) -> None: ...          # called in layer order
    capture_prefill(model, input_ids, on_layer, layers=[0, 3])  # the pass stops after layer 3
    got = capture_prefill(model, input_ids, layers=[5])      # no callback: {5: CapturedLayer}

One dense forward pass with the capture attention function of `pbs_kernels.integrations.hf`
(`capture_attention`), under `torch.inference_mode`, with `use_cache=False` (a KV cache would
change what attention sees) and the logits cut to the last position (`logits_to_keep` or
`num_logits_to_keep`, whichever the model takes: a 128K x vocab logits tensor is ~30 GiB). The
pass raises `StopForward` after the last wanted layer, so later layers never run. `analyze`,
`tune` and `bench` all capture through here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .errors import AttentionNotCaptured, LayerMissing, ModelUnsupported

__all__ = ["CapturedLayer", "capture_prefill", "logits_kwargs", "model_layers"]


@dataclass
class CapturedLayer:
    """One attention layer's inputs in the prefill.

    q: [1, HQ, N, D]; k, v: [1, H, N, D] (not repeated for grouped-query attention); scale: the
    model's softmax scale; softcap / sliding_window as the model passes them; fallback: why the
    "pbs" attention function would run this layer dense whatever the profile ("softcap 30",
    "sliding window 4096", "head dim 96"), None when PBS can run it. The tensors are the
    forward's own (no copy): keep them, move them or drop them in the callback.
    """

    layer: int
    q: Any
    k: Any
    v: Any
    scale: float
    softcap: float | None = None
    sliding_window: int | None = None
    fallback: str | None = None


def logits_kwargs(model) -> dict[str, Any]:
    """Forward kwargs asking for the last position's logits only, in the spelling this model's
    forward takes (transformers renamed num_logits_to_keep to logits_to_keep); {} if neither."""
    params = inspect.signature(model.forward).parameters
    for key in ("logits_to_keep", "num_logits_to_keep"):
        if key in params:
            return {key: 1}
    return {}


def model_layers(model, name: str = "") -> list[int]:
    """Indices of the attention layers PBS can drive; ModelUnsupported when there are none."""
    from pbs_kernels.integrations.hf import attention_layers

    layers = sorted({m.layer_idx for m in attention_layers(model)})
    if not layers:
        raise ModelUnsupported(name or type(model).__name__, type(model).__name__)
    return layers


def capture_prefill(
    model,
    input_ids,
    on_layer: Callable[[CapturedLayer], None] | None = None,
    *,
    layers: Iterable[int] | None = None,
    name: str = "",
) -> dict[int, CapturedLayer]:
    """Run one prefill of `input_ids` [1, N] and capture the attention inputs of `layers` (None:
    all). With `on_layer`, each layer goes to the callback and nothing is kept (returns {});
    without, returns {layer: CapturedLayer}.

    Raises ModelUnsupported (no attention layer PBS can drive), LayerMissing (a wanted index
    past the model) and AttentionNotCaptured (the model bypasses transformers'
    AttentionInterface, so nothing reached the capture).
    """
    import torch

    from pbs_kernels.integrations.hf import PbsIntegrationError, StopForward, capture_attention

    name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    all_layers = model_layers(model, name)
    wanted = all_layers if layers is None else sorted(set(int(i) for i in layers))
    missing = [i for i in wanted if i not in all_layers]
    if missing:
        raise LayerMissing(missing[0], len(all_layers))
    last = wanted[-1]
    kept: dict[int, CapturedLayer] = {}
    seen: set[int] = set()

    def on_call(call):
        q, k = call.query, call.key
        if q.shape[0] != 1 or q.shape[2] != k.shape[2]:
            return None  # not the prefill driven here (cannot happen with use_cache=False)
        idx = int(call.layer_idx)
        layer = CapturedLayer(idx, q, k, call.value, float(call.scaling), call.softcap, call.sliding_window,
                              call.fallback_reason())
        seen.add(idx)
        if on_layer is None:
            kept[idx] = layer
        else:
            on_layer(layer)
        if idx == last:
            raise StopForward
        return None

    try:
        with torch.inference_mode(), capture_attention(model, on_call, layers=wanted):
            try:
                model(input_ids=input_ids, use_cache=False, **logits_kwargs(model))
            except StopForward:
                pass
    except PbsIntegrationError as e:
        raise ModelUnsupported(name, type(model).__name__, str(e)) from None
    if not seen:
        raise AttentionNotCaptured(name, type(model).__name__)
    return kept
