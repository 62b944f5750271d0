"""What the forward, the capture hook and apply/remove share, and nothing that depends on them:
the names registered with transformers, the attributes bound to attention modules, the one error,
and finding and selecting a model's attention implementation (through the public setter where
transformers has one, else the config field).
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "pbs"
CAPTURE_NAME = "pbs_capture"
_STATE_ATTR = "_pbs_state"
_CAPTURE_ATTR = "_pbs_capture"


class PbsIntegrationError(ValueError):
    """A model PBS cannot be applied to; the message is one line saying why and what to do."""


def _register(name: str, function: Callable) -> None:
    """Register an attention function and its mask function under `name`. Idempotent."""
    AttentionInterface.register(name, function)
    # sdpa_mask returns None for unpadded causal prefill and decode (the fast path) and a boolean
    # mask otherwise, which the dense path applies; padding is never dropped.
    AttentionMaskInterface.register(name, sdpa_mask)


def attention_layers(model) -> list[torch.nn.Module]:
    """The model's attention modules: those with an integer `layer_idx` and 'Attention' in
    their class name (decoder layers and mixers also carry a layer_idx)."""
    return [
        m for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and "Attention" in type(m).__name__
    ]


def _require_attention_layers(model) -> list[torch.nn.Module]:
    modules = attention_layers(model)
    if not modules:
        raise PbsIntegrationError(
            f"{type(model).__name__} has no attention layers with a layer_idx; PBS supports decoder "
            "models whose attention goes through transformers' AttentionInterface (Llama, Qwen, Mistral, Gemma...)"
        )
    return modules


def _current_impl(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def _select(model, name: str | None, *, check: bool = True) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if name is None:
        name = "sdpa"
    if callable(setter):
        setter(name)
    else:  # transformers without the public setter
        model.config._attn_implementation = name
    if check and _current_impl(model) != name:
        raise PbsIntegrationError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            f"so attention '{name}' cannot be selected; PBS supports Llama, Qwen2/3, Mistral, Gemma and "
            "other models built on the attention interface"
        )
