"""The bench's inputs: seeded synthetic Q/K/V (pbs_kernels.workloads) or one layer captured from a
model's prefill (workflows.capture, the path `pbs analyze` and `pbs tune` use)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from pbs_kernels.workloads import WORKLOADS as MAKERS

from ..capture import capture_prefill
from ..model import build_prompt, check_seq_len, load_model
from ..progress import ProgressFn
from ._util import _free
from .settings import BenchSettings


@dataclass
class Workload:
    q: Any
    k: Any
    v: Any
    scale: float
    note: Optional[str] = None


def synthetic_workload(s: BenchSettings, n: int, device, dtype, *, seed: Optional[int] = None,
                       batch: Optional[int] = None) -> Workload:
    """`s.workload`'s maker at n tokens (seed and batch default to the settings')."""
    make = MAKERS[s.workload if s.workload in MAKERS else "synthetic"]
    q, k, v = make(n, s.heads, s.kv_heads, s.head_dim, batch=s.batch if batch is None else batch, dtype=dtype,
                   device=device, seed=s.seed if seed is None else seed)
    return Workload(q, k, v, 1.0 / math.sqrt(s.head_dim))


def capture_layer(loaded, input_ids, layer: int) -> Workload:
    """Q/K/V (after RoPE, K/V not repeated for GQA) of attention layer `layer` in one prefill; the
    pass stops right after it."""
    got = capture_prefill(loaded.model, input_ids, layers=[layer], name=loaded.name)[layer]
    notes = []
    if got.softcap is not None:
        notes.append(f"layer {layer} uses logit softcap {got.softcap:g}, which PBS and the baselines ignore here")
    if got.sliding_window is not None and got.sliding_window < input_ids.shape[1]:
        notes.append(f"layer {layer} is a sliding-window layer ({got.sliding_window}); benched as full causal attention")
    # The attention inputs are fresh tensors of this forward (no KV cache): no copy beyond contiguity.
    q, k, v = (t.contiguous() for t in (got.q, got.k, got.v))
    return Workload(q, k, v, got.scale, note="; ".join(notes) or None)


def captured_workloads(s: BenchSettings, seq_lens: list[int], device, dtype, progress: ProgressFn,
                       notes: list[str]) -> dict[int, Workload]:
    """Layer `s.layer` (0) of `s.model` at each length, in `dtype`; notes about the layer are
    appended to `notes`. The model is freed before returning."""
    loaded = load_model(s.model, device=device.type, dtype=s.dtype)
    layer = 0 if s.layer is None else s.layer
    workloads = {}
    for i, n in enumerate(seq_lens):
        check_seq_len(loaded, n)
        progress("capture", i, len(seq_lens))
        prompt = build_prompt(loaded, n)
        if prompt.note:
            notes.append(prompt.note)
        wl = capture_layer(loaded, prompt.input_ids, layer)
        if wl.note and wl.note not in notes:
            notes.append(wl.note)
        if wl.q.dtype != dtype:
            wl = Workload(wl.q.to(dtype), wl.k.to(dtype), wl.v.to(dtype), wl.scale)
        workloads[n] = wl
    progress("capture", len(seq_lens), len(seq_lens))
    w0 = workloads[seq_lens[0]]
    notes.append(f"captured {loaded.name} layer {layer}: heads {w0.q.shape[1]}, kv heads {w0.k.shape[1]}, "
                 f"head dim {w0.q.shape[3]}, scale {w0.scale:.4g} (the synthetic workload's head counts and head "
                 "dim do not apply)")
    del loaded
    _free(device)
    return workloads
