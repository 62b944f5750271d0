"""The whole-prompt case's baselines, by the name `--baselines` takes: one registry entry each.

    BASELINES["cudnn"]  Dense: dense causal SDPA forced to the cuDNN backend (row sdpa-cudnn)
    BASELINES["flex"]   Sparse: FlexAttention over PBS's kept tiles (rows flex, flex.attend)

Dense entries run before PBS, in registry order; the fastest that passes is the speedup's
denominator (and the reference above `fp32_ref_max_len`). Sparse entries run after PBS's rows
and reuse its plan, its sampled kernel check and the reference through the case (prompt.py,
`Prompt`). The CLI's --baselines choices and default are this registry's keys.

A new baseline: a function of the case and one entry here (plus a column in render.py if it
reports a new metric). torch-free at import (the command reads the keys at start-up): the
entries reach torch only through the case's tensors and helpers that import it themselves.
"""

from __future__ import annotations

from pbs_kernels.metrics import output_error as rel_error

from .. import timing
from ._util import _one_line, _sync
from .flex import flex_call
from .harness import Dense, Sparse, kernel_error
from .results import FAILED, OK, SKIPPED, UNAVAILABLE, MethodResult


def _sdpa(backend: str):
    """Dense causal SDPA on one backend (K/V heads repeated for GQA beforehand, outside the timed
    call, on the GPU: Prompt.dense_kv)."""

    def call(c):
        run = timing.sdpa_runner(backend, c.q, *c.dense_kv(), scale=c.scale)
        return run if run.available else run.reason

    return call


def _flex(c) -> list[MethodResult]:
    """torch FlexAttention over exactly PBS's kept tiles, in the permuted key order: flex.attend is
    the kernel alone; flex adds pbs.permute + pbs.select (the same pipeline with FlexAttention as
    the attend kernel). Building the BlockMask is not timed."""
    h, pbs = c.h, c.pbs
    if h.layer.vertical_keys:
        return [MethodResult("flex", SKIPPED, note="FlexAttention runs the tiles only; the profile adds vertical keys")]
    fn = out = None
    reason = ""
    # A forward-only BlockMask first (no transposed index); some torch versions want one.
    for q_blocks in (False, True):
        try:
            fn = flex_call(c.q, c.plan, compiled=h.timed, compute_q_blocks=q_blocks)
            out = fn()
            _sync(h.device)
            break
        except Exception as e:  # noqa: BLE001 - any failure to build or compile: report, go on
            fn, out, reason = None, None, _one_line(e)
    if fn is None:
        return [MethodResult("flex", UNAVAILABLE, note=reason), MethodResult("flex.attend", UNAVAILABLE, note=reason)]
    note = "same tiles as pbs" + ("" if h.timed else "; eager (uncompiled) on cpu")
    kern = MethodResult("flex.attend", OK, flops=pbs.flops, density=pbs.density, recall=pbs.recall,
                        error=rel_error(out, c.ref), kernel_error=kernel_error(out, *c.tiles), note=note)
    del out
    kern.ms = h.time(fn, c.n)
    h.gate(kern)
    total = MethodResult("flex", kern.status, flops=pbs.flops, density=pbs.density, recall=pbs.recall,
                         error=kern.error, kernel_error=kern.kernel_error,
                         note="pbs.permute + pbs.select + flex.attend (BlockMask build not timed)")
    if kern.status == FAILED:
        total.note = kern.note
    if kern.ms is not None and c.stages_ms is not None:
        total.ms = kern.ms + c.stages_ms
    return [total, kern]


def _noperm(c) -> list[MethodResult]:
    """PBS with permutation off, same threshold: an ablation, so only its kernel is gated; its
    error is what turning permutation off costs."""
    if not c.h.layer.permute:
        return [MethodResult("pbs-noperm", SKIPPED, note="the benched config already has permute off")]
    row, _ = c.plan_row("pbs-noperm", c.plan_with(permute=False))
    row.ms = c.h.time(c.pbs_call(permute=False), c.n)
    return [c.h.gate(row, accuracy=False)]


BASELINES = {
    "cudnn": Dense(_sdpa("cudnn"), row="sdpa-cudnn"),
    "flash": Dense(_sdpa("flash"), row="sdpa-flash"),
    "efficient": Dense(_sdpa("efficient"), row="sdpa-efficient"),
    "flex": Sparse(_flex),
    "noperm": Sparse(_noperm),
}
