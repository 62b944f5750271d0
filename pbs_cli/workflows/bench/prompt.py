"""The whole-prompt case of `pbs bench`: one Q/K/V of N tokens, every query against every earlier key.

    result = prompt_case(harness, workload)     # a SeqLenResult, rows gated and credited

Rows, in order: the dense baselines asked for (baselines.BASELINES, registry order); pbs
(permute + select + attend, as pbs_attention runs them) and each stage alone; pbs-auto below the
layer's min_seq_len; then the sparse baselines asked for, which reuse PBS's plan through the
`Prompt` they are given. Sibling of serving.chunk_case and serving.varlen_case.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Optional

from pbs_kernels.analysis import analyze_layer
from pbs_kernels.attention import PbsPlan, pbs_attention, pbs_plan, permute_stage, select_stage
from pbs_kernels.metrics import output_error as rel_error
from pbs_kernels.metrics import recall_from_lse as recall_of
from pbs_kernels.reference import dense_reference, tile_reference

from .. import timing
from ..lengths import format_length
from ._util import _free
from .baselines import BASELINES
from .harness import Dense, Harness, causal_flops, check_blocks, credit, fastest, kernel_error, plan_flops
from .results import FAILED, OK, SKIPPED, UNAVAILABLE, MethodResult, SeqLenResult
from .workloads import Workload


class Prompt:
    """One prompt as its rows see it: the inputs and the harness; after the dense rows the
    reference output; after PBS's rows its plan, its row, the sampled rows of its kernel check
    and the time of its permute + select stages, for the sparse baselines to reuse."""

    def __init__(self, h: Harness, wl: Workload):
        self.h, self.q, self.k, self.v, self.scale = h, wl.q, wl.k, wl.v, wl.scale
        self.n = wl.q.shape[2]
        self.ref = None  # dense output the rows are compared with
        self.lse_full = None  # log-sum-exp over every causal key (recall's denominator)
        self.plan = None  # PBS's PbsPlan
        self.pbs: Optional[MethodResult] = None
        self.tiles: tuple = ()  # (reference rows, row indices) of the sampled kernel check
        self.stages_ms: Optional[float] = None  # pbs.permute + pbs.select
        self.call_cost: Optional[dict] = None
        self._dense_kv = None

    def dense_kv(self) -> tuple:
        """K/V with one head per query head on the GPU (shared by the SDPA backends, made outside
        any timed call); as given on the CPU."""
        if self._dense_kv is None:
            self._dense_kv = timing.expand_kv(self.q, self.k, self.v) if self.h.timed else (self.k, self.v)
        return self._dense_kv

    def plan_with(self, **override):
        """pbs_plan of the benched layer's settings (with `override`) on this prompt."""
        return pbs_plan(self.q, self.k, self.v, scale=self.scale, backend=self.h.backend,
                        **{**self.h.layer.plan_kwargs(), **override})

    def pbs_call(self, **override) -> Callable[[], Any]:
        """A no-argument pbs_attention call on the sparse path at every length (min_seq_len 0)."""
        q, k, v, scale = self.q, self.k, self.v, self.scale
        kw = self.h.pbs_kwargs(min_seq_len=0, **override)
        return lambda: pbs_attention(q, k, v, scale=scale, **kw)

    def plan_row(self, name: str, plan) -> tuple[MethodResult, tuple]:
        """A row for `plan`: its work, density, recall, error vs the reference and kernel error on
        sampled query blocks vs exact attention over the same tiles (ungated, untimed); and the
        sampled rows."""
        q, layer = self.q, self.h.layer
        S, vk, blocks = layer.segment_size, layer.vertical_keys, plan.blocks
        out, lse = plan.attend(q, return_lse=True)
        qblocks = check_blocks(blocks.num_blocks, blocks.block_size, S)
        tiles = tile_reference(q, plan.k, plan.v, plan.pos, blocks, qblocks, self.scale, vk, S)
        row = MethodResult(name, OK, flops=plan_flops(blocks, q.shape[3], S, vk),
                           density=float(blocks.density_per_head().mean()), recall=recall_of(lse, self.lse_full),
                           error=rel_error(out, self.ref), kernel_error=kernel_error(out, *tiles))
        return row, tiles


def prompt_case(h: Harness, wl: Workload) -> SeqLenResult:
    """Every row of one prompt, gated, with speedups against its fastest dense row."""
    q, k = wl.q, wl.k
    B, HQ, N, D = q.shape
    want = [(name, BASELINES[name]) for name in BASELINES if name in h.s.baselines]
    dense = [(name, b) for name, b in want if isinstance(b, Dense)]
    sparse = [b for _, b in want if not isinstance(b, Dense)]
    step = h.steps(f"bench {format_length(N)}", 2 + len(dense) + len(sparse))
    result = SeqLenResult(N, B, HQ, k.shape[1], D, reference="fp32", fastest_dense=None, fastest_dense_ms=None)
    c = Prompt(h, wl)
    if not h.timed or N <= h.s.fp32_ref_max_len:
        c.ref = dense_reference(q, k, wl.v, wl.scale)
    else:
        result.reference = "fastest dense"
    step()
    dense_rows = _dense_rows(c, result, dense, step)
    _free(h.device)
    pbs_rows = _pbs_rows(c)
    step()
    sparse_rows = []
    for b in sparse:
        sparse_rows += b.rows(c)
        step()
    result.methods = dense_rows + pbs_rows + sparse_rows
    result.pbs_call = c.call_cost
    del c  # K/V copies, plans, tiles and the reference
    _free(h.device)
    return credit(result)


def _dense_rows(c: Prompt, result: SeqLenResult, dense: list, step) -> list[MethodResult]:
    """The dense baselines. With the fp32 reference each output is checked and dropped at once;
    without (long prompts on the GPU), outputs wait until the fastest backend, the reference, is
    known."""
    h, N = c.h, c.n
    B, HQ, _, D = c.q.shape
    fields = dict(flops=causal_flops(B, HQ, D, N), density=1.0, recall=1.0)
    rows, held = {}, {}
    for name, b in dense:
        call = b.call(c)
        method = b.row or name
        if isinstance(call, str):
            rows[name] = MethodResult(method, UNAVAILABLE, note=call)
        elif call is not None and c.ref is not None:
            rows[name] = h.measure(method, call, c.ref, N, dense=True, **fields)
        elif call is not None:
            held[name] = call()
            rows[name] = MethodResult(method, OK, **fields)
            rows[name].ms = h.time(call, N)
        step()
    c._dense_kv = None
    best = fastest(rows)
    if best is not None:
        result.fastest_dense, result.fastest_dense_ms = best, rows[best].ms
    if c.ref is None:
        if best is None:
            c.ref = dense_reference(c.q, c.k, c.v, c.scale)  # no dense backend ran: pay for fp32 after all
            result.reference = "fp32"
        else:
            c.ref = held.pop(best)
            result.reference = rows[best].method
            rows[best].error = 0.0
        for name, out in held.items():
            h.gate_dense(rows[name], rel_error(out, c.ref), result.reference)
        held.clear()
    return list(rows.values())


def _pbs_rows(c: Prompt) -> list[MethodResult]:
    """pbs (its plan kept on `c`), pbs.permute, pbs.select, pbs.attend, and pbs-auto where the
    layer's min_seq_len sends a model to the dense fallback (or "auto")."""
    h, layer, q, N = c.h, c.h.layer, c.q, c.n
    # One permutation for the plan, its threshold-1.0 twin and the select stage's timing (each a
    # copy of K/V in slot order), as pbs_plan chains the stages.
    stage = dict(block_size=layer.block_size, segment_size=layer.segment_size, scale=c.scale, backend=h.backend)
    keys = permute_stage(q, c.k, c.v, permute=layer.permute, **stage)
    select = partial(select_stage, q, keys, threshold=layer.threshold, estimator=layer.estimator,
                     threshold_mass=layer.threshold_mass, **stage)
    c.plan = PbsPlan.of(keys, select(), layer.settings(scale=c.scale, backend=h.backend))
    # The full-softmax lse recall needs: the same plan at threshold 1.0 (every causal tile).
    full = dataclasses.replace(c.plan, blocks=select_stage(q, keys, threshold=1.0, **stage), threshold=1.0)
    _, c.lse_full = full.attend(q, return_lse=True)
    del full
    pbs, c.tiles = c.plan_row("pbs", c.plan)
    c.pbs = pbs
    pbs.selection_efficiency = _efficiency(c)
    call = c.pbs_call()
    pbs.ms = h.time(call, N)
    if h.profiled:
        # a few calls under the profiler: ~1% of the row's timing budget
        c.call_cost = timing.call_cost(call, reps=3 if N > 65536 else 10, host_calls=5 if N > 65536 else 30)

    # The stages one by one, as pbs_plan chains them, each timed alone.
    if layer.permute:
        t_perm = h.time(lambda: permute_stage(q, c.k, c.v, permute=True, **stage), N)
        perm_row = MethodResult("pbs.permute", OK, ms=t_perm)
    else:
        t_perm = 0.0 if h.timed else None
        perm_row = MethodResult("pbs.permute", SKIPPED, note="permute off")
    t_sel = h.time(select, N)
    del keys, select  # the key statistics (the plan keeps K/V in slot order)
    t_att = h.time(lambda: c.plan.attend(q), N)
    c.stages_ms = t_perm + t_sel if t_perm is not None and t_sel is not None else None
    sel_row = MethodResult("pbs.select", OK, ms=t_sel)
    att_row = MethodResult("pbs.attend", OK, ms=t_att, flops=pbs.flops, density=pbs.density)
    h.gate(pbs)
    if pbs.status == FAILED:
        att_row.status, att_row.note = FAILED, "the kernel of the FAILED pbs row"
    rows = [pbs, perm_row, sel_row, att_row]
    if layer.min_seq_len == "auto" or (layer.min_seq_len and N < layer.min_seq_len):
        rows.append(_auto(c))
    return rows


def _efficiency(c: Prompt) -> Optional[float]:
    """Selection efficiency of the benched settings (`pbs_kernels.analysis.analyze_layer`: the
    exact block masses, chunked, never N x N; vertical keys counted in recall and work); None
    when permutation is off (the analysis measures the permuted selection)."""
    layer = c.h.layer
    if not layer.permute:
        return None
    a = analyze_layer(c.q, c.k, layer.settings(scale=c.scale, backend=c.h.backend))
    return a.selection_efficiency


def _auto(c: Prompt) -> MethodResult:
    """pbs_attention as a model calls it, min_seq_len included (the dense fallback below an
    integer min_seq_len; under "auto" whichever path it measured faster)."""
    h, layer, N = c.h, c.h.layer, c.n
    q, k, v, scale = c.q, c.k, c.v, c.scale
    kw = h.pbs_kwargs()
    out, st = pbs_attention(q, k, v, scale=scale, return_stats=True, **kw)
    if layer.min_seq_len == "auto":
        note = f"min_seq_len auto: {'dense' if st.dense else 'PBS'} measured faster at {N} tokens"
    else:
        note = f"dense fallback: {N} tokens < min_seq_len {layer.min_seq_len}"
    row = MethodResult("pbs-auto", OK, flops=causal_flops(*q.shape[:2], q.shape[3], N),
                       density=float(st.density), recall=1.0 if st.dense else None,
                       error=rel_error(out, c.ref), note=note)
    del out, st
    row.ms = h.time(lambda: pbs_attention(q, k, v, scale=scale, **kw), N)
    return h.gate(row)
