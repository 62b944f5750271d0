"""The "pbs" attention function transformers calls at inference, and the state it reads.

`pbs_attention_forward` reads the settings of `module.layer_idx` from the `_State` that
`apply_profile` bound to the module (the default profile when none was bound), decides whether
the call can run PBS (`_dense_reason`; what the kernels do not implement is `_unsupported`, which
the capture hook's `AttentionCall.fallback_reason` asks too), turns a padding, packing or chunk
mask into packed sequences for `pbs_attention_varlen`, and otherwise runs exact dense attention
(`_dense`, which the capture function also falls back to).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface

from ...attention import pbs_attention, pbs_attention_varlen
from ...limits import HEAD_DIMS
from ...profile import LayerConfig, PbsProfile
from ._common import _STATE_ATTR

# One instance to look up the stock functions ("sdpa") the dense path delegates to.
_ATTENTION = AttentionInterface()


class PbsFallbackWarning(UserWarning):
    """Some layers run dense attention because PBS does not implement one of their features."""


@dataclass
class LayerStats:
    """What one attention layer did in its last call (collected with `collect_stats=True`).

    density: computed tiles / causal tiles, mean over heads; 1.0 when dense.
    reason: why the layer ran dense (None when PBS ran): "dense layer", "decode", "short prompt",
        "non-causal", "dropout", "head dim", "attention mask", "dtype".
    sequences: independent sequences PBS saw in the call (packed or padded batches unpad into
        several); density is their mean, a dense (short) one counting 1.0.
    """

    layer_idx: int | None
    q_len: int
    kv_len: int
    dense: bool
    reason: str | None
    density: float
    density_per_head: list[float] | None = None
    sequences: int = 1


@dataclass
class _State:
    """Everything bound to one model by apply_profile (shared by its attention modules)."""

    profile: PbsProfile
    previous: str | None
    backend: str = "auto"
    collect_stats: bool = False
    graph: bool | str = "auto"  # pbs_attention's `graph` for prefill calls
    last_stats: dict[Any, LayerStats] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    _configs: dict[Any, LayerConfig] = field(default_factory=dict, repr=False)
    # The last few decoded masks (a model's layers share one or two mask tensors per forward):
    # (mask tensor, window) -> _Layout or None. Holding the tensor keeps its identity unique.
    _layouts: list = field(default_factory=list, repr=False)

    def config_for(self, layer_idx: int | None) -> LayerConfig:
        cfg = self._configs.get(layer_idx)
        if cfg is None:
            cfg = self.profile.defaults if layer_idx is None else self.profile.layer(layer_idx)
            self._configs[layer_idx] = cfg
        return cfg

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, PbsFallbackWarning, stacklevel=4)


# A model loaded with attn_implementation="pbs" but never given a profile runs the defaults.
_DEFAULT_STATE: _State | None = None


def _default_state() -> _State:
    global _DEFAULT_STATE
    if _DEFAULT_STATE is None:
        _DEFAULT_STATE = _State(PbsProfile.default(), previous=None)
    return _DEFAULT_STATE


# ---------------------------------------------------------------------------------------------
# Dense paths (exact).


def _eager_dense(module, query, key, value, attention_mask, dropout, scaling, softcap, sinks=None):
    """Plain softmax attention with soft-capping or learned sinks, which SDPA cannot do. Takes the
    boolean or additive masks of the "pbs" mask function; no mask means causal (upper-left
    aligned, which is what transformers means by passing none)."""
    G = query.shape[1] // key.shape[1]
    if G > 1:
        key = key.repeat_interleave(G, dim=1)
        value = value.repeat_interleave(G, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, kv_len = scores.shape[-2:]
    if attention_mask is not None:
        mask = attention_mask[..., :kv_len]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    elif q_len > 1 and getattr(module, "is_causal", True):
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if sinks is not None:
        # One more logit per head in the denominator, dropped after the softmax (gpt-oss).
        sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
        probs = probs.to(query.dtype)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if softcap is not None or sinks is not None:
        return _eager_dense(module, query, key, value, attention_mask, dropout, scaling, softcap, sinks)
    rest = {k: v for k, v in kwargs.items() if k not in ("softcap", "s_aux", "sinks")}
    return _ATTENTION["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **rest)


# ---------------------------------------------------------------------------------------------
# The "pbs" attention function.


def _unsupported(query, key, value, kwargs) -> tuple[str, str, str] | None:
    """The first feature of this attention call that the PBS kernels do not implement, as
    (label, detail, message), or None. The one place that decides it: the attention function,
    `AttentionCall.fallback_reason` and through it the toolkit's analysis and tuning use it.
    Soft-capping, sliding windows and learned sinks (one logit per query head) are implemented;
    sinks of another shape are not."""
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (query.shape[1],)):
        return ("attention sinks", "attention sinks of shape " + str(tuple(getattr(sinks, "shape", ()))),
                f"uses attention sinks that are not one logit per query head ({query.shape[1]}); PBS implements "
                "only those, so such layers run dense attention")
    D = query.shape[-1]
    if D not in HEAD_DIMS or value.shape[-1] != D:
        return ("head dim", f"head dim {D}",
                f"has head dim {D}, which the PBS kernels do not support (supported: "
                f"{', '.join(map(str, HEAD_DIMS))}); attention runs dense")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (query.dtype == key.dtype == value.dtype):
        return ("dtype", f"dtype {query.dtype}",
                f"has dtype {query.dtype}, which the PBS kernels do not support; attention runs dense")
    return None


def _dense_reason(state: _State, module, query, key, value, attention_mask, dropout, kwargs, cfg, layer_idx):
    """Why this call must run dense attention, or None when PBS can run. Features PBS does not
    implement warn once per model."""
    q_len, kv_len = query.shape[2], key.shape[2]
    where = f"layer {layer_idx}" if layer_idx is not None else "a layer"
    if cfg.dense:
        return "dense layer"
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        return "non-causal"
    if q_len == 1 or (q_len != kv_len and attention_mask is None and not _has_cu_seqlens(kwargs)):
        return "decode"  # one query per step (a chunk always comes with a mask from transformers)
    if cfg.short_for(kv_len):
        return "short prompt"  # dense by design: no warning for what PBS would not run anyway
    if dropout and module.training:
        state.warn_once("dropout", "pbs: attention dropout is on (training mode); PBS is an inference kernel, so "
                        "attention runs dense; call model.eval() for PBS")
        return "dropout"
    found = _unsupported(query, key, value, kwargs)
    if found is not None:
        label, _, message = found
        state.warn_once(label, f"pbs: {where} {message}")
        return label
    if _has_cu_seqlens(kwargs):
        return None
    if attention_mask is not None and _layout(state, attention_mask, q_len, kv_len, _window(kwargs, kv_len)) is None:
        # Not causal attention over contiguous runs of keys (a custom mask): the dense path applies it.
        state.warn_once("mask", "pbs: the attention mask is not causal over contiguous runs of keys (padding, "
                        "packed sequences, chunks, sliding window), so this forward runs dense attention "
                        "with the mask")
        return "attention mask"
    return None


# ---------------------------------------------------------------------------------------------
# Masks -> packed sequences (padded batches, packing, chunks against a cache).


def _has_cu_seqlens(kwargs) -> bool:
    return kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None


def _window(kwargs, kv_len: int) -> int | None:
    w = kwargs.get("sliding_window")
    return int(w) if w is not None and w < kv_len else None


@dataclass
class _Layout:
    """Where each packed sequence lies in the padded [B, q_len] / [B, kv_len] tensors."""

    rows_b: torch.Tensor  # [T_q] batch index of each packed query row
    rows_q: torch.Tensor  # [T_q] query row
    keys_b: torch.Tensor  # [T_k] batch index of each packed key row
    keys_k: torch.Tensor  # [T_k] key row
    cu_q: torch.Tensor  # [S + 1] int32
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def _decode_mask(mask: torch.Tensor, q_len: int, kv_len: int, window: int | None) -> _Layout | None:
    """The packed layout a boolean mask [B, 1, q_len, kv_len] describes, or None when it is not
    causal attention over contiguous runs of keys.

    Each query row must allow one contiguous range of keys ending at its own position (the last
    allowed key); rows that allow none are padding. Consecutive rows with consecutive positions and
    one first key form a sequence whose queries are the last M of its keys first .. last position;
    with a window, rows whose range is the full window continue the sequence before them. The
    decoded layout is then checked against every row (start, window, contiguity), so a mask it
    cannot express gives None, never a wrong layout. All on the mask's device: O(B q kv) for the
    row reductions, O(B q) after."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (q_len, kv_len):
        return None
    m = mask[:, 0]
    j = torch.arange(kv_len, device=m.device)
    count = m.sum(-1)  # [B, q]
    first = torch.where(m, j, kv_len).amin(-1)
    last = torch.where(m, j, -1).amax(-1)
    valid = count > 0
    rb, rq = torch.nonzero(valid, as_tuple=True)  # packed query rows, batch-major, rows ascending
    if rb.numel() == 0:
        return None
    f, p = first[rb, rq], last[rb, rq]
    if not bool((count[rb, rq] == p - f + 1).all()):
        return None  # a row with holes
    full = (f == p - window + 1) if window is not None else torch.zeros_like(f, dtype=torch.bool)
    brk = torch.ones_like(f, dtype=torch.bool)
    brk[1:] = ((rb[1:] != rb[:-1]) | (p[1:] != p[:-1] + 1)
               | (~full[1:] & (full[:-1] | (f[1:] != f[:-1]))))
    gid = torch.cumsum(brk.to(torch.int64), 0) - 1
    heads = torch.nonzero(brk).flatten()  # first packed row of each sequence
    tails = torch.cat([heads[1:] - 1, heads.new_tensor([f.numel() - 1])])
    start = f[heads]  # [S] first key of each sequence
    end = p[tails] + 1
    lo = start[gid] if window is None else torch.maximum(start[gid], p - window + 1)
    if not bool((f == lo).all()):
        return None
    same_b = rb[heads[1:]] == rb[tails[:-1]]
    if not bool((~same_b | (start[1:] > p[tails[:-1]])).all()):
        return None  # overlapping sequences in one row
    n_q = tails - heads + 1
    n_k = end - start
    cu_q = torch.zeros(heads.numel() + 1, dtype=torch.int32, device=m.device)
    cu_k = torch.zeros_like(cu_q)
    cu_q[1:] = torch.cumsum(n_q, 0)
    cu_k[1:] = torch.cumsum(n_k, 0)
    total_k = int(cu_k[-1])
    seq_of_key = torch.repeat_interleave(torch.arange(heads.numel(), device=m.device), n_k, output_size=total_k)
    kk = start[seq_of_key] + torch.arange(total_k, device=m.device) - cu_k[:-1].long()[seq_of_key]
    kb = rb[heads][seq_of_key]
    return _Layout(rb, rq, kb, kk, cu_q, cu_k, int(n_q.max()), int(n_k.max()))


def _layout(state: _State, mask: torch.Tensor, q_len: int, kv_len: int, window: int | None) -> _Layout | None:
    for held, w, lay in state._layouts:
        if held is mask and w == window:
            return lay
    lay = _decode_mask(mask, q_len, kv_len, window)
    state._layouts = [*state._layouts[-3:], (mask, window, lay)]
    return lay


def _cu_layout(kwargs, B: int, q_len: int, kv_len: int) -> _Layout | None:
    """Flash-style packing: batch 1, sequences given by cu_seq_lens_q / cu_seq_lens_k."""
    cq, ck = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    if B != 1 or int(cq[-1]) != q_len or int(ck[-1]) != kv_len:
        return None
    dev = cq.device
    zq, zk = torch.zeros(q_len, dtype=torch.long, device=dev), torch.zeros(kv_len, dtype=torch.long, device=dev)
    return _Layout(zq, torch.arange(q_len, device=dev), zk, torch.arange(kv_len, device=dev),
                   cq.to(torch.int32), ck.to(torch.int32), int(cq.diff().max()), int(ck.diff().max()))


def pbs_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """transformers attention function: query [B, HQ, N, D], key/value [B, H, KV, D] (post-RoPE)
    -> (output [B, N, HQ, D], None)."""
    state = getattr(module, _STATE_ATTR, None) or _default_state()
    layer_idx = getattr(module, "layer_idx", None)
    cfg = state.config_for(layer_idx)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    reason = _dense_reason(state, module, query, key, value, attention_mask, dropout, kwargs, cfg, layer_idx)
    if reason is not None:
        out = _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        if state.collect_stats:
            state.last_stats[layer_idx] = LayerStats(layer_idx, query.shape[2], key.shape[2], True, reason, 1.0)
        return out
    B, HQ, q_len, D = query.shape
    kv_len = key.shape[2]
    softcap = kwargs.get("softcap")
    knobs = dict(cfg.plan_kwargs(), min_seq_len=cfg.min_seq_len, scale=scaling, backend=state.backend,
                 return_stats=state.collect_stats, window=_window(kwargs, kv_len),
                 sinks=kwargs.get("s_aux", kwargs.get("sinks")), softcap=None if softcap is None else float(softcap),
                 graph=state.graph)
    layout = None
    if _has_cu_seqlens(kwargs):
        layout = _cu_layout(kwargs, B, q_len, kv_len)
    elif attention_mask is not None:
        layout = _layout(state, attention_mask, q_len, kv_len, knobs["window"])
    if layout is None and (attention_mask is not None or _has_cu_seqlens(kwargs)):
        # cu_seq_lens that do not match the tensors: the dense path decides what they mean.
        return _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    if layout is None:
        result = pbs_attention(query, key, value, **knobs)
        out, stats = result if state.collect_stats else (result, None)
        out = out.transpose(1, 2).contiguous()
        stats = None if stats is None else [stats]
    else:
        # Unpad: [T, heads, D] rows of each sequence, then scatter back (padding rows get zeros,
        # which later layers never attend to).
        qt, kt, vt = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        qp = qt[layout.rows_b, layout.rows_q]
        kp, vp = kt[layout.keys_b, layout.keys_k], vt[layout.keys_b, layout.keys_k]
        result = pbs_attention_varlen(qp, kp, vp, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, **knobs)
        packed, stats = result if state.collect_stats else (result, None)
        out = query.new_zeros(B, q_len, HQ, D)
        out[layout.rows_b, layout.rows_q] = packed
        stats = None if stats is None else [st for st in stats if st is not None]
    if stats:
        ran = [st for st in stats if not st.dense]
        per_head = torch.stack([st.density_per_head.float() for st in stats]).mean(0)
        state.last_stats[layer_idx] = LayerStats(
            layer_idx, q_len, kv_len, not ran, None if ran else "short prompt",
            float(sum(st.density for st in stats) / len(stats)), [float(x) for x in per_head], len(stats),
        )
    return out, None

