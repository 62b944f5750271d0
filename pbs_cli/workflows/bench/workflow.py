"""The `pbs bench` workflow: time PBS attention against dense and sparse baselines, and check it.

    report = run_bench(BenchSettings(seq_lens=[8192, 32768]), progress=report_fn)

Per sequence length, on one Q/K/V (synthetic or captured from a model layer):

* pbs           permute + select + attend, as `pbs_attention` runs them; and each part alone
                (pbs.permute, pbs.select, pbs.attend), calling the ops directly.
* sdpa-cudnn, sdpa-flash, sdpa-efficient
                dense causal SDPA forced to one backend (K/V heads repeated for grouped-query
                attention beforehand, outside the timed call).
* flex          torch FlexAttention (compiled) over exactly PBS's kept tiles, in the permuted
                key order: flex.attend is the kernel alone; flex adds pbs.permute + pbs.select,
                i.e. the same pipeline with FlexAttention as the attend kernel. Building the
                BlockMask is not timed.
* pbs-noperm    PBS with permutation off, same threshold.

Metrics (docs/design.md, Metrics):

* ms: median of `triton.testing.do_bench` (pbs_cli.workflows.timing.time_ms). None on the CPU.
* flops / tflops: dense rows count exact causal work, 4*D flops per (query, allowed key) pair
  (2*D for q.k, 2*D for p.v): 2*B*HQ*D*N*(N+1). Sparse rows count every computed tile in full,
  masked diagonal tiles included: 4*b*b*D per tile per query head. tflops = flops / time.
* density: computed tiles / causal tiles nb*(nb+1)/2, mean over heads (1.0 for dense).
* recall: mean over queries and heads of exp(lse_sparse - lse_full), both from `attend` with
  return_lse on the same permuted keys, lse_full with a threshold-1.0 block list.
* error: ||O - O_ref||_F / ||O_ref||_F in fp32. O_ref is an fp32 computation of dense causal
  attention (chunked, never N x N in memory) up to `fp32_ref_max_len` tokens, else the output
  of the fastest dense backend ("reference" in each result says which).
* kernel_error: the same norm, on a sample of query blocks, against exact fp32 attention over
  the same kept tiles: it isolates the kernel from the sparsity approximation.
* speedup: time of the fastest dense backend measured / time of the row.

Correctness gate, in the same run: a row whose kernel_error exceeds the kernel tolerance
(2e-2 in bf16/fp16, 1e-3 in fp32), or whose error exceeds `max_error` (default 0.05, or 2e-2
at threshold 1.0), is FAILED and gets no speedup. A dense backend fails above 2e-2. pbs-noperm is
an ablation: only its kernel_error is gated, its error is what turning permutation off costs.

The workflow never prints: it reports progress through `progress(desc, done, total)` and returns
a `BenchReport` of plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from pbs_kernels.metrics import output_error as rel_error
from pbs_kernels.metrics import recall_from_lse as recall_of
from pbs_kernels.reference import dense_reference, tile_reference

from .. import distributed
from ..capture import capture_prefill
from ..errors import (DeviceError, GpuRequired, HeadsNotMultiple, OutOfMemoryAt, SeqLenNotAboveSegment,
                      TensorParallelBenchScope, UsageError, WorkloadUnknown)
from ..lengths import format_length
from ..progress import ProgressFn, no_progress
from ._util import _free, _one_line, _sync
from .e2e import run_e2e
from .flex import flex_block_mask
# The data types live in results.py (torch-free); re-exported here, the module tests and callers use.
# N_CHECK_BLOCKS and tile_flops are re-exported: callers (tests) read them from this module.
from .harness import (DENSE_TOL, KERNEL_TOL, N_CHECK_BLOCKS, causal_flops, check_blocks,  # noqa: F401
                      kernel_error, plan_flops, tile_flops)
from .results import (BASELINES, CSV_COLUMNS, FAILED, OK, SKIPPED, UNAVAILABLE, WORKLOADS,  # noqa: F401
                      BenchReport, BenchSettings, E2EResult, EnvInfo, MethodResult, PbsConfig, SeqLenResult,
                      csv_rows)

DENSE_BACKENDS = ("cudnn", "flash", "efficient")
CPU_MAX_SEQ_LEN = 2048  # the CPU pass computes fp32 references and eager FlexAttention
# ---------------------------------------------------------------------------------------------
# Environment, device, profile.


def resolve_bench_device(device: str):
    """'auto'/'cuda' need a GPU (bench times GPU kernels); 'cpu' is the correctness-only pass."""
    import torch

    device = getattr(device, "value", device)
    if device == "cpu":
        return torch.device("cpu")
    if device not in ("auto", "cuda"):
        raise DeviceError(f"unknown device {device!r}; use auto, cuda or cpu")
    if not torch.cuda.is_available():
        raise GpuRequired(CPU_MAX_SEQ_LEN)
    return torch.device("cuda")


def environment(device, dtype) -> EnvInfo:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        timing = "median of triton.testing.do_bench"
        if distributed.ranks().active:
            timing = "time to first token: median over reps of the slowest rank's wall clock"
    else:
        name, cudnn = "cpu", None
        timing = "none (cpu: correctness only)"
    return EnvInfo(
        device=name,
        cuda=torch.version.cuda if device.type == "cuda" else None,
        cudnn=str(cudnn) if cudnn else None,
        torch=torch.__version__,
        triton=triton_version,
        transformers=tf_version,
        dtype=str(dtype).replace("torch.", ""),
        timing=timing,
        ranks=distributed.ranks().world,
    )


def pbs_config(profile_path: Optional[str], layer: Optional[int]) -> tuple[PbsConfig, list[str]]:
    """Knobs from `PbsProfile.load(path).layer(L or 0)`, else the method defaults."""
    from pbs_kernels.profile import LayerConfig, PbsProfile

    notes = []
    if profile_path is None:
        cfg, source = LayerConfig(), "defaults"
    else:
        idx = 0 if layer is None else int(layer)
        cfg = PbsProfile.load(profile_path).layer(idx)
        source = f"{profile_path} layer {idx}"
        if cfg.dense:
            notes.append(f"{source} is `dense: true` (the model runs it dense); benching its PBS knobs anyway")
    if cfg.min_seq_len == "auto":
        notes.append("min_seq_len auto: 'pbs' times the sparse path at every length; 'pbs-auto' times what a "
                     "model runs (dense or PBS, whichever pbs_attention measured faster for the shape)")
    elif cfg.min_seq_len:
        notes.append(f"min_seq_len {cfg.min_seq_len}: 'pbs' times the sparse path at every length; below "
                     f"{cfg.min_seq_len} tokens 'pbs-auto' times what a model runs there (pbs_attention's dense "
                     "fallback)")
    return PbsConfig(cfg.block_size, cfg.segment_size, float(cfg.threshold), bool(cfg.permute), source,
                     cfg.min_seq_len if cfg.min_seq_len == "auto" else int(cfg.min_seq_len), cfg.estimator, cfg.threshold_mass, int(cfg.vertical_keys)), notes


# ---------------------------------------------------------------------------------------------
# Workloads.


@dataclass
class Workload:
    q: Any
    k: Any
    v: Any
    scale: float
    note: Optional[str] = None


def synthetic_workload(s: BenchSettings, n: int, device, dtype) -> Workload:
    from pbs_kernels.workloads import WORKLOADS as MAKERS

    make = MAKERS[s.workload if s.workload in MAKERS else "synthetic"]
    q, k, v = make(n, s.heads, s.kv_heads, s.head_dim, batch=s.batch, dtype=dtype, device=device, seed=s.seed)
    return Workload(q, k, v, 1.0 / math.sqrt(s.head_dim))


def capture_layer(loaded, input_ids, layer: int) -> Workload:
    """Q/K/V (after RoPE, K/V not repeated for GQA) of attention layer `layer` in one prefill
    (workflows.capture, the path `pbs analyze` and `pbs tune` use); the pass stops right after it."""
    got = capture_prefill(loaded.model, input_ids, layers=[layer], name=loaded.name)[layer]
    notes = []
    if got.softcap is not None:
        notes.append(f"layer {layer} uses logit softcap {got.softcap:g}, which PBS and the baselines ignore here")
    if got.sliding_window is not None and got.sliding_window < input_ids.shape[1]:
        notes.append(f"layer {layer} is a sliding-window layer ({got.sliding_window}); benched as full causal attention")
    # The attention inputs are fresh tensors of this forward (no KV cache): no copy beyond contiguity.
    q, k, v = (t.contiguous() for t in (got.q, got.k, got.v))
    return Workload(q, k, v, got.scale, note="; ".join(notes) or None)


# ---------------------------------------------------------------------------------------------
# The attention bench for one sequence length.


class _Bench:
    def __init__(self, s: BenchSettings, cfg: PbsConfig, device, dtype, progress: ProgressFn):
        self.s, self.cfg, self.device, self.dtype, self.progress = s, cfg, device, dtype, progress
        self.timed = device.type == "cuda"
        self.pbs_call: Optional[dict] = None  # the current length's timing.call_cost of the pbs row
        self.backend = "triton" if self.timed else "torch"
        self.kernel_tol = KERNEL_TOL["fp32"] if dtype_is_fp32(dtype) else KERNEL_TOL["low"]
        self.max_error = s.max_error if s.max_error is not None else (0.05 if cfg.threshold < 1.0 else 2e-2)
        self._flex = None

    # -- timing --------------------------------------------------------------------------

    def time(self, fn: Callable[[], Any], n: int) -> Optional[float]:
        if not self.timed:
            return None
        from ..timing import bench_budget, time_ms

        warmup, rep = bench_budget(n)
        return time_ms(fn, warmup=warmup, rep=rep)

    # -- gate ----------------------------------------------------------------------------

    def gate(self, row: MethodResult, *, accuracy: bool = True) -> MethodResult:
        """FAILED when the kernel is wrong on its own tiles, or (accuracy=True) when the output is
        further from dense than max_error. accuracy=False for an ablation such as pbs-noperm:
        its error is the figure it exists to show (2k tokens, default shape, CPU: 5.17% against
        PBS's 4.36%), not a fault of the run."""
        problems = []
        if row.kernel_error is not None and not row.kernel_error <= self.kernel_tol:
            problems.append(f"kernel_error {row.kernel_error:.3g} > {self.kernel_tol:g} vs exact attention on the same tiles")
        if accuracy and row.error is not None and not row.error <= self.max_error:
            problems.append(f"error {row.error:.3g} > max error {self.max_error:g}")
        if problems:
            row.status = FAILED
            row.note = "; ".join(problems + ([row.note] if row.note else []))
        return row

    # -- the run -------------------------------------------------------------------------

    def _gate_dense(self, row: MethodResult, error: float, reference: str) -> None:
        row.error = error
        if not error <= DENSE_TOL:
            row.status, row.note = FAILED, f"error {error:.3g} > {DENSE_TOL:g} vs the {reference} reference"

    def run(self, n: int, wl: Workload) -> SeqLenResult:
        s, cfg = self.s, self.cfg
        q, k, v, scale = wl.q, wl.k, wl.v, wl.scale
        B, HQ, N, D = q.shape
        H = k.shape[1]
        want = set(s.baselines)
        steps = ["reference", *[d for d in DENSE_BACKENDS if d in want], "pbs",
                 *(["flex"] if "flex" in want else []), *(["noperm"] if "noperm" in want and cfg.permute else [])]
        desc = f"bench {format_length(N)}"
        done = 0

        def step():
            nonlocal done
            done += 1
            self.progress(desc, done, len(steps))

        self.progress(desc, 0, len(steps))
        result = SeqLenResult(N, B, HQ, H, D, reference="fp32", fastest_dense=None, fastest_dense_ms=None)
        ref = None
        if not self.timed or N <= s.fp32_ref_max_len:
            ref = dense_reference(q, k, v, scale)
        else:
            result.reference = "fastest dense"
        step()

        # Dense SDPA backends. With the fp32 reference each output is checked and dropped at
        # once; without, outputs wait until the fastest backend (the reference) is known.
        dense_rows, dense_out = [], {}
        wanted_dense = [d for d in DENSE_BACKENDS if d in want]
        if wanted_dense:
            from ..timing import expand_kv, sdpa_runner

            kx, vx = expand_kv(q, k, v) if self.timed else (k, v)
            for name in wanted_dense:
                run = sdpa_runner(name, q, kx, vx, scale=scale)
                if not run.available:
                    dense_rows.append(MethodResult(f"sdpa-{name}", UNAVAILABLE, note=run.reason))
                    step()
                    continue
                row = MethodResult(f"sdpa-{name}", OK, flops=causal_flops(B, HQ, D, N), density=1.0, recall=1.0)
                out = run()
                if ref is not None:
                    self._gate_dense(row, rel_error(out, ref), "fp32")
                else:
                    dense_out[name] = out
                del out
                row.ms = self.time(run, N)
                dense_rows.append(row)
                step()
            del kx, vx
        timed = [r for r in dense_rows if r.status == OK and r.ms is not None]
        fastest = min(timed, key=lambda r: r.ms) if timed else None
        if fastest is not None:
            result.fastest_dense, result.fastest_dense_ms = fastest.method.removeprefix("sdpa-"), fastest.ms
        if ref is None:
            if fastest is None:
                ref = dense_reference(q, k, v, scale)  # no dense backend ran: pay for fp32 after all
                result.reference = "fp32"
            else:
                ref = dense_out.pop(result.fastest_dense)
                result.reference = fastest.method
                fastest.error = 0.0
            for name, out in dense_out.items():
                self._gate_dense(next(r for r in dense_rows if r.method == f"sdpa-{name}"), rel_error(out, ref),
                                 result.reference)
            dense_out.clear()
        _free(self.device)

        # PBS, its parts, the full-density list for recall, and FlexAttention on the same tiles.
        pbs_rows, lse_full = self._pbs(q, k, v, scale, ref, step, want)
        # PBS without permutation.
        noperm_rows = []
        if "noperm" in want:
            if cfg.permute:
                noperm_rows = [self._noperm(q, k, v, scale, ref, lse_full)]
                step()
            else:
                noperm_rows = [MethodResult("pbs-noperm", SKIPPED, note="the benched config already has permute off")]
        del lse_full, ref
        _free(self.device)

        result.methods = dense_rows + pbs_rows + noperm_rows
        result.pbs_call, self.pbs_call = self.pbs_call, None
        base = result.fastest_dense_ms
        for row in result.methods:
            if row.ms and row.flops:
                row.tflops = row.flops / (row.ms * 1e-3) / 1e12
            if row.status == OK and row.ms and base and not row.method.startswith(("pbs.", "flex.")):
                row.speedup = base / row.ms
        return result

    def _pbs(self, q, k, v, scale, ref, step, want):
        from pbs_kernels.attention import PbsPlan, pbs_attention, permute_stage, select_stage

        cfg, be, N = self.cfg, self.backend, q.shape[2]
        b, S, tau = cfg.block_size, cfg.segment_size, cfg.threshold
        D = q.shape[3]
        knobs = {"block_size": b, "segment_size": S, "scale": scale, "backend": be}
        rule = {"estimator": cfg.estimator, "threshold_mass": cfg.threshold_mass}
        vk = cfg.vertical_keys

        # The stages one by one (each is timed alone below), as pbs_plan chains them; a second
        # selection at threshold 1.0 on the same keys gives the full-softmax lse recall needs.
        keys = permute_stage(q, k, v, permute=cfg.permute, **knobs)
        blocks = select_stage(q, keys, threshold=tau, **knobs, **rule)
        plan = PbsPlan(keys.k, keys.v, keys.pos, blocks, scale, be, b, S, tau, keys.permuted, **rule, vertical_keys=vk)
        out, lse = plan.attend(q, return_lse=True)
        full = dataclasses.replace(plan, blocks=select_stage(q, keys, threshold=1.0, **knobs), threshold=1.0)
        _, lse_full = full.attend(q, return_lse=True)
        del full, _
        k_p, v_p, pos = plan.k, plan.v, plan.pos
        qblocks = check_blocks(blocks.num_blocks, b, S)
        ref_rows, rows = tile_reference(q, k_p, v_p, pos, blocks, qblocks, scale, vk, S)

        flops = plan_flops(blocks, D, S, vk)
        density = float(blocks.density_per_head().mean())
        pbs = MethodResult("pbs", OK, flops=flops, density=density, recall=recall_of(lse, lse_full),
                           error=rel_error(out, ref), kernel_error=kernel_error(out, ref_rows, rows))
        del out, lse
        pbs.selection_efficiency = self._efficiency(q, k, scale)
        sparse = dict(cfg.runtime_kwargs(), min_seq_len=0)  # the sparse path at every length
        pbs.ms = self.time(lambda: pbs_attention(q, k, v, scale=scale, backend=be, **sparse), N)
        if self.timed and q.is_cuda:
            from ..timing import call_cost

            # a few calls under the profiler: ~1% of the row's timing budget
            self.pbs_call = call_cost(lambda: pbs_attention(q, k, v, scale=scale, backend=be, **sparse),
                                      reps=3 if N > 65536 else 10, host_calls=5 if N > 65536 else 30)
        if cfg.permute:
            t_perm = self.time(lambda: permute_stage(q, k, v, permute=True, **knobs), N)
            perm_row = MethodResult("pbs.permute", OK, ms=t_perm)
        else:
            t_perm = 0.0 if self.timed else None
            perm_row = MethodResult("pbs.permute", SKIPPED, note="permute off")
        t_sel = self.time(lambda: select_stage(q, keys, threshold=tau, **knobs, **rule), N)
        t_att = self.time(lambda: plan.attend(q), N)
        sel_row = MethodResult("pbs.select", OK, ms=t_sel)
        att_row = MethodResult("pbs.attend", OK, ms=t_att, flops=flops, density=density)
        self.gate(pbs)
        if pbs.status == FAILED:
            att_row.status, att_row.note = FAILED, "the kernel of the FAILED pbs row"
        step()

        rows_out = [pbs, perm_row, sel_row, att_row]
        if cfg.min_seq_len == "auto" or (cfg.min_seq_len and N < cfg.min_seq_len):
            rows_out.append(self._auto(q, k, v, scale, ref))
        if "flex" in want and vk:
            rows_out.append(MethodResult("flex", SKIPPED, note="FlexAttention runs the tiles only; "
                                                               "the profile adds vertical keys"))
        elif "flex" in want:
            rows_out += self._flex_rows(q, k_p, v_p, pos, blocks, scale, ref, ref_rows, rows, flops, density,
                                        pbs.recall, t_perm, t_sel)
            step()
        return rows_out, lse_full  # K/V copies, tiles and references are freed on return

    def _efficiency(self, q, k, scale) -> Optional[float]:
        """Selection efficiency of the benched knobs (`pbs_kernels.analysis.analyze_layer`: the
        exact block masses, chunked, never N x N; vertical keys counted in recall and work); None
        when permutation is off (the analysis measures the permuted selection)."""
        from pbs_kernels.analysis import analyze_layer
        from pbs_kernels.settings import PbsSettings

        cfg = self.cfg
        if not cfg.permute:
            return None
        a = analyze_layer(q, k, PbsSettings(**cfg.runtime_kwargs(), scale=scale, backend=self.backend))
        return a.selection_efficiency

    def _auto(self, q, k, v, scale, ref) -> MethodResult:
        """pbs_attention as a model calls it, min_seq_len included (the dense fallback below an
        integer min_seq_len; under "auto" whichever path it measured faster)."""
        from pbs_kernels import pbs_attention

        cfg, N = self.cfg, q.shape[2]

        def call():
            return pbs_attention(q, k, v, scale=scale, backend=self.backend, **cfg.runtime_kwargs())

        out, st = pbs_attention(q, k, v, scale=scale, backend=self.backend, return_stats=True,
                                **cfg.runtime_kwargs())
        if cfg.min_seq_len == "auto":
            note = f"min_seq_len auto: {'dense' if st.dense else 'PBS'} measured faster at {N} tokens"
        else:
            note = f"dense fallback: {N} tokens < min_seq_len {cfg.min_seq_len}"
        row = MethodResult("pbs-auto", OK, flops=causal_flops(*q.shape[:2], q.shape[3], N),
                           density=float(st.density), recall=1.0 if st.dense else None,
                           error=rel_error(out, ref), note=note)
        del out, st
        row.ms = self.time(call, N)
        return self.gate(row)

    def _flex_rows(self, q, k_p, v_p, pos, blocks, scale, ref, ref_rows, rows, flops, density, recall,
                   t_perm, t_sel) -> list[MethodResult]:
        fn = out = None
        reason = ""
        # A forward-only BlockMask first (no transposed index); some torch versions want one.
        for q_blocks in (False, True):
            try:
                fn = self._flex_call(q, k_p, v_p, pos, blocks, scale, compute_q_blocks=q_blocks)
                out = fn()
                _sync(self.device)
                break
            except Exception as e:  # noqa: BLE001 - any failure to build or compile: report, go on
                fn, out, reason = None, None, _one_line(e)
        if fn is None:
            return [MethodResult("flex", UNAVAILABLE, note=reason), MethodResult("flex.attend", UNAVAILABLE, note=reason)]
        note = "same tiles as pbs" + ("" if self.timed else "; eager (uncompiled) on cpu")
        kern = MethodResult("flex.attend", OK, flops=flops, density=density, recall=recall,
                            error=rel_error(out, ref), kernel_error=kernel_error(out, ref_rows, rows), note=note)
        del out
        kern.ms = self.time(fn, q.shape[2])
        self.gate(kern)
        total = MethodResult("flex", kern.status, flops=flops, density=density, recall=recall, error=kern.error,
                             kernel_error=kern.kernel_error, note="pbs.permute + pbs.select + flex.attend "
                             "(BlockMask build not timed)")
        if kern.status == FAILED:
            total.note = kern.note
        if kern.ms is not None and t_perm is not None and t_sel is not None:
            total.ms = kern.ms + t_perm + t_sel
        return [total, kern]

    def _flex_call(self, q, k_p, v_p, pos, blocks, scale, *, compute_q_blocks: bool = False):
        """A no-argument call of FlexAttention over PBS's kept tiles (compiled on the GPU)."""
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        G = q.shape[1] // k_p.shape[1]
        b = blocks.block_size
        bm = flex_block_mask(blocks, pos, G, q.shape[2], tile_checked_mask=not self.timed,
                             compute_q_blocks=compute_q_blocks)
        opts: dict[str, Any] = {}
        if b < 128:
            # The kernel's tiles must divide the mask's blocks.
            opts["kernel_options"] = {"BLOCK_M": b, "BLOCK_N": b}
        if G > 1:
            opts["enable_gqa"] = True
        if self.timed:
            if self._flex is None:
                self._flex = torch.compile(flex_attention, dynamic=False)
            flex = self._flex
            return lambda: flex(q, k_p, v_p, block_mask=bm, scale=scale, **opts)

        def call_eager():
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
                return flex_attention(q, k_p, v_p, block_mask=bm, scale=scale, **opts)

        return call_eager

    def _noperm(self, q, k, v, scale, ref, lse_full) -> MethodResult:
        from pbs_kernels.attention import pbs_attention, pbs_plan

        cfg, be = self.cfg, self.backend
        D, N = q.shape[3], q.shape[2]
        b, S, tau = cfg.block_size, cfg.segment_size, cfg.threshold
        rule = {"estimator": cfg.estimator, "threshold_mass": cfg.threshold_mass}
        plan = pbs_plan(q, k, v, block_size=b, segment_size=S, threshold=tau, permute=False, scale=scale, backend=be,
                        vertical_keys=cfg.vertical_keys, **rule)
        blocks = plan.blocks
        out, lse = plan.attend(q, return_lse=True)
        ref_rows, rows = tile_reference(q, plan.k, plan.v, plan.pos, blocks, check_blocks(blocks.num_blocks, b, S), scale,
                                        cfg.vertical_keys, S)
        row = MethodResult(
            "pbs-noperm", OK, flops=plan_flops(blocks, D, S, cfg.vertical_keys),
            density=float(blocks.density_per_head().mean()),
            # The full-density lse is a sum over the same keys in any order: reuse the permuted one.
            recall=recall_of(lse, lse_full), error=rel_error(out, ref), kernel_error=kernel_error(out, ref_rows, rows),
        )
        del out, lse, blocks, plan, ref_rows
        noperm = dict(cfg.runtime_kwargs(), min_seq_len=0, permute=False)
        row.ms = self.time(lambda: pbs_attention(q, k, v, scale=scale, backend=be, **noperm), N)
        return self.gate(row, accuracy=False)


def cpu_cap_note(seq_lens) -> Optional[str]:
    """What the CPU pass does to lengths above CPU_MAX_SEQ_LEN (None when none is)."""
    over = [n for n in seq_lens if n > CPU_MAX_SEQ_LEN]
    if not over:
        return None
    return (f"cpu: {', '.join(format_length(n) for n in over)} token(s) capped to {format_length(CPU_MAX_SEQ_LEN)}, "
            f"the CPU pass's limit (correctness only, no timing); run on a GPU for longer lengths")


def dtype_is_fp32(dtype) -> bool:
    import torch

    return dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Entry point.


def run_bench(s: BenchSettings, progress: ProgressFn = no_progress) -> BenchReport:
    """Run the attention bench (and the e2e bench with `s.e2e`); returns plain results."""
    from ..model import resolve_dtype

    if s.workload not in WORKLOADS:
        raise WorkloadUnknown(s.workload)
    unknown = [b for b in s.baselines if b not in BASELINES]
    if unknown:
        raise UsageError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    if s.workload != "captured" and s.heads % s.kv_heads:
        raise HeadsNotMultiple(s.heads, s.kv_heads)
    launch = distributed.ranks()
    if launch.active:
        # A sharded model's first token is what tensor parallelism changes; the attention rows
        # time one GPU's kernels on synthetic heads, the same with or without torchrun.
        asked = [what for what, on in (("attention", not s.e2e), ("chunk", bool(s.chunks)),
                                       ("lengths", bool(s.lengths)), ("serving_only", not s.prompt_rows),
                                       ("captured", s.workload == "captured")) if on]
        if asked:
            raise TensorParallelBenchScope(launch.world, asked)
    device = resolve_bench_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    cfg, notes = pbs_config(s.profile, s.layer)

    seq_lens = list(s.seq_lens)
    if device.type == "cpu":
        capped = [min(n, CPU_MAX_SEQ_LEN) for n in seq_lens]
        note = cpu_cap_note(seq_lens)
        if note is not None:
            notes.append(note)
        seq_lens = list(dict.fromkeys(capped))
    for n in seq_lens:
        if n <= cfg.segment_size:
            raise SeqLenNotAboveSegment(n, cfg.segment_size)
    settings = asdict(s)
    settings["seq_lens"] = seq_lens
    chunks = sorted(set(s.chunks))
    lengths = list(s.lengths)
    if device.type == "cpu" and (chunks or lengths):
        chunks = [min(c, CPU_MAX_SEQ_LEN // 2) for c in chunks]
        lengths = [min(n, CPU_MAX_SEQ_LEN) for n in lengths]
        if chunks != sorted(set(s.chunks)) or lengths != list(s.lengths):
            notes.append(f"cpu: chunks capped at {CPU_MAX_SEQ_LEN // 2} and batch lengths at {CPU_MAX_SEQ_LEN} tokens")
    for c in chunks:
        if any(c >= n for n in seq_lens):
            raise UsageError(f"a prefill chunk of {format_length(c)} tokens is not shorter than the "
                             f"{format_length(min(seq_lens))}-token prompt; chunks must be shorter than every length")
    if (chunks or lengths) and s.workload != "synthetic":
        raise UsageError("the chunked-prefill and varlen rows use the synthetic workload only")
    if not s.prompt_rows and not (chunks or lengths):
        raise UsageError("nothing to bench: no whole-prompt rows and no chunk or varlen rows")
    settings["chunks"], settings["lengths"] = chunks, lengths
    report = BenchReport(environment(device, dtype), settings, cfg, s.workload, notes=notes)

    if s.e2e:
        # First: its checks (model, profile fits it) must not wait for the attention bench. The
        # model is freed before the attention bench, which then has the GPU's memory to itself.
        e2e, e2e_notes = run_e2e(s, device, progress)
        report.e2e = e2e
        report.notes.extend(e2e_notes)
    if launch.active:
        report.notes.append(f"tensor-parallel run ({launch.world} processes): no attention rows; they time one "
                            "GPU's kernels, so run them in one process")
        return report

    workloads: dict[int, Workload] = {}
    if s.workload == "captured":
        from ..model import build_prompt, check_seq_len, load_model

        loaded = load_model(s.model, device=device.type, dtype=s.dtype)
        layer = 0 if s.layer is None else s.layer
        for i, n in enumerate(seq_lens):
            check_seq_len(loaded, n)
            progress("capture", i, len(seq_lens))
            prompt = build_prompt(loaded, n)
            if prompt.note:
                notes.append(prompt.note)
            workloads[n] = capture_layer(loaded, prompt.input_ids, layer)
            if workloads[n].note and workloads[n].note not in notes:
                notes.append(workloads[n].note)
            if workloads[n].q.dtype != dtype:
                w = workloads[n]
                workloads[n] = Workload(w.q.to(dtype), w.k.to(dtype), w.v.to(dtype), w.scale)
        progress("capture", len(seq_lens), len(seq_lens))
        w0 = workloads[seq_lens[0]]
        notes.append(f"captured {loaded.name} layer {layer}: heads {w0.q.shape[1]}, kv heads {w0.k.shape[1]}, "
                     f"head dim {w0.q.shape[3]}, scale {w0.scale:.4g} (the synthetic workload's head counts and head dim do not apply)")
        del loaded
        _free(device)


    bench = _Bench(s, cfg, device, dtype, progress)
    for n in seq_lens if s.prompt_rows else []:
        wl = workloads.pop(n, None) or synthetic_workload(s, n, device, dtype)
        try:
            report.results.append(bench.run(n, wl))
        except Exception as e:
            import torch

            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise OutOfMemoryAt(n) from None
            raise
        finally:
            del wl
            _free(device)

    if chunks or lengths:
        import torch

        from .serving import chunk_case, varlen_case

        try:
            for n in seq_lens if chunks else []:
                wl = synthetic_workload(s, n, device, dtype)
                for c in chunks:
                    report.results.append(chunk_case(bench, wl, n, c))
                del wl
                _free(device)
            if lengths:
                one = dataclasses.replace(s, batch=1)
                report.results.append(varlen_case(
                    bench, lengths, lambda n, i: synthetic_workload(dataclasses.replace(one, seed=s.seed + i), n,
                                                                    device, dtype)))
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemoryAt(max([*seq_lens, *lengths])) from None

    return report
