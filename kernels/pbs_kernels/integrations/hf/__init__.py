"""PBS attention inside Hugging Face transformers models, through the public AttentionInterface.

    from pbs_kernels.integrations.hf import apply_profile, remove_profile, pbs_profile
    apply_profile(model, "profiles/llama8b.yaml")   # long prefills now run PBS attention
    remove_profile(model)                           # back to the attention the model had

    with pbs_profile(model, profile):               # the same, scoped
        model(input_ids)

`register()` adds an attention function "pbs" to transformers' `AttentionInterface` and a mask
function "pbs" to `AttentionMaskInterface` (without one, transformers builds no mask at all for an
unknown implementation, so padding would be silently dropped). `apply_profile` selects "pbs" on
the model and binds the profile to every attention module; the function reads the settings of
`module.layer_idx` at each call.

PBS runs for causal prefill of prompts longer than the layer's `min_seq_len` and its segment:
whole prompts, prompt chunks against a KV cache (transformers' chunked prefill: the queries are
the last M of the N cached positions), padded batches and packed sequences (`position_ids` that
restart, or flash-style `cu_seq_lens_q/k` kwargs), which are unpadded into
`pbs_attention_varlen`; sliding windows, learned sinks (gpt-oss) and logit soft-capping (Gemma 2)
run inside the kernels. A mask is used only when it is exactly causal attention over contiguous
runs of keys (padding, packing, chunks, the layer's window); any other mask runs dense. Exact
dense attention also serves decode steps (one query), layers marked `dense: true`, short prompts,
and, with one warning per model, what PBS does not implement: dropout, head dims other than
64, 80, 96, 128 and 256, other dtypes and custom masks.

`capture_attention` is the hook the toolkit's analysis uses: it hands each layer's post-RoPE Q,
K and V to a callback during a normal forward pass.

The package is split by what each part changes for: `forward.py` (the "pbs" attention function
and the state it reads: when a call falls back to dense, masks decoded into packed sequences),
`capture.py` (`capture_attention`, `AttentionCall`, `StopForward`, and `register()`, which adds
both attention functions), `apply.py` (`apply_profile`, `remove_profile`, `pbs_profile`,
`pbs_stats`) and `_common.py` (the registered names, `PbsIntegrationError`, finding and selecting
a model's attention layers). Imports run one way: _common <- forward <- capture <- apply.
"""

from ._common import ATTN_NAME, CAPTURE_NAME, PbsIntegrationError, attention_layers
from .apply import apply_profile, pbs_profile, pbs_stats, remove_profile
from .capture import AttentionCall, StopForward, capture_attention, register
# pbs_attention_forward is not in __all__ (as before the split) but tests call it by this path.
from .forward import LayerStats, PbsFallbackWarning, pbs_attention_forward  # noqa: F401

__all__ = [
    "ATTN_NAME",
    "CAPTURE_NAME",
    "AttentionCall",
    "LayerStats",
    "PbsFallbackWarning",
    "PbsIntegrationError",
    "StopForward",
    "apply_profile",
    "attention_layers",
    "capture_attention",
    "pbs_profile",
    "pbs_stats",
    "register",
    "remove_profile",
]
