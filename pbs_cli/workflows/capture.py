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

__all__ = ["CapturedLayer", "capture_during", "capture_prefill", "logits_kwargs", "model_layers"]


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
    without, returns {layer: CapturedLayer}. The pass stops after the last wanted layer.

    Raises ModelUnsupported (no attention layer PBS can drive), LayerMissing (a wanted index
    past the model) and AttentionNotCaptured (the model bypasses transformers'
    AttentionInterface, so nothing reached the capture).
    """
    kept: dict[int, CapturedLayer] = {}
    sink = on_layer if on_layer is not None else (lambda layer: kept.__setitem__(layer.layer, layer))
    capture_during(model, lambda: model(input_ids=input_ids, use_cache=False, **logits_kwargs(model)), sink,
                   layers=layers, name=name, stop_after_last=True)
    return kept


def capture_during(model, forward: Callable[[], Any], on_layer: Callable[[CapturedLayer], None], *,
                   layers: Iterable[int] | None = None, name: str = "", stop_after_last: bool = False):
    """Call `forward()` (one prefill of `model`, dense) with every wanted layer's attention inputs
    going to `on_layer` as they are computed; returns what `forward` returned (None when the pass
    stopped after the last wanted layer, `stop_after_last=True`). `capture_prefill` is this with
    the plain forward; tune's validation passes its own forward, which needs the full output.
    Same errors as `capture_prefill`.
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
    seen: set[int] = set()

    def on_call(call):
        q, k = call.query, call.key
        if q.shape[0] != 1 or q.shape[2] != k.shape[2]:
            return None  # not the prefill driven here (cannot happen with use_cache=False)
        idx = int(call.layer_idx)
        seen.add(idx)
        on_layer(CapturedLayer(idx, q, k, call.value, float(call.scaling), call.softcap, call.sliding_window,
                               call.fallback_reason()))
        if stop_after_last and idx == last:
            raise StopForward
        return None

    result = None
    try:
        with torch.inference_mode(), capture_attention(model, on_call, layers=wanted):
            try:
                result = forward()
            except StopForward:
                pass
    except PbsIntegrationError as e:
        raise ModelUnsupported(name, type(model).__name__, str(e)) from None
    if not seen:
        raise AttentionNotCaptured(name, type(model).__name__)
    return result
