"""The `pbs bench` workflow: time PBS attention against dense and sparse baselines, and check it.

    report = run_bench(BenchSettings(seq_lens=[8192, 32768]), progress=report_fn)

run_bench checks the settings, loads the profile once, then runs the cases on one Q/K/V each
(synthetic or captured from a model layer): prompt.prompt_case per --seq-len, serving.chunk_case
per (length, chunk) and serving.varlen_case for --lengths. The rows (baselines.py, serving.py):

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

Correctness gate, in the same run (harness.Harness): a row whose kernel_error exceeds the kernel
tolerance (2e-2 in bf16/fp16, 1e-3 in fp32), or whose error exceeds `max_error` (default 0.05,
or 2e-2 at threshold 1.0), is FAILED and gets no speedup. A dense backend fails above 2e-2.
pbs-noperm is an ablation: only its kernel_error is gated, its error is what turning
permutation off costs.

The workflow never prints: it reports progress through `progress(desc, done, total)` and returns
a `BenchReport` of plain dataclasses.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import torch
import triton

from pbs_kernels.graphs import auto_worth_it

from .. import distributed
from ..errors import (DeviceError, GpuRequired, HeadsNotMultiple, OutOfMemoryAt, SeqLenNotAboveSegment,
                      TensorParallelBenchScope, UsageError, WorkloadUnknown)
from ..lengths import format_length
from ..model import resolve_dtype
from ..profiles import load_profile
from ..progress import ProgressFn, no_progress
from ._util import _free
from .baselines import BASELINES
from .e2e import run_e2e
from .harness import Harness
from .prompt import prompt_case
from .results import BenchReport, EnvInfo, PbsConfig
from .serving import chunk_case, varlen_case
from .settings import CPU_MAX_SEQ_LEN, WORKLOADS, BenchSettings, cpu_cap_note
from .workloads import captured_workloads, synthetic_workload

# Re-exported: the tests read the bench's names from this module.
from pbs_kernels.metrics import output_error as rel_error  # noqa: E402
from .flex import flex_block_mask  # noqa: E402
from .harness import N_CHECK_BLOCKS, causal_flops, check_blocks, kernel_error, tile_flops  # noqa: E402
from .results import CSV_COLUMNS, MethodResult, SeqLenResult, csv_rows  # noqa: E402

__all__ = ["BenchSettings", "BenchReport", "CPU_MAX_SEQ_LEN", "CSV_COLUMNS", "EnvInfo", "MethodResult", "N_CHECK_BLOCKS",
           "PbsConfig", "SeqLenResult", "causal_flops", "check_blocks", "csv_rows", "environment", "flex_block_mask",
           "kernel_error", "pbs_config", "rel_error", "resolve_bench_device", "run_bench", "tile_flops"]

# ---------------------------------------------------------------------------------------------
# Environment, device, profile.


def resolve_bench_device(device: str):
    """'auto'/'cuda' need a GPU (bench times GPU kernels); 'cpu' is the correctness-only pass."""
    device = getattr(device, "value", device)
    if device == "cpu":
        return torch.device("cpu")
    if device not in ("auto", "cuda"):
        raise DeviceError(f"unknown device {device!r}; use auto, cuda or cpu")
    if not torch.cuda.is_available():
        raise GpuRequired(CPU_MAX_SEQ_LEN)
    return torch.device("cuda")


def environment(device, dtype) -> EnvInfo:
    try:
        import transformers  # optional: only --e2e and the captured workload need it

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        timing = "median of triton.testing.do_bench; pbs calls with graph=auto, as apply_profile"
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
        triton=triton.__version__,
        transformers=tf_version,
        dtype=str(dtype).replace("torch.", ""),
        timing=timing,
        ranks=distributed.ranks().world,
    )


def pbs_config(profile, path: Optional[str], layer: Optional[int]) -> tuple[PbsConfig, list[str]]:
    """Layer `layer` (0) of `profile` (loaded from `path`; the defaults when path is None), and
    notes on what the bench makes of its dense and min_seq_len settings."""
    notes = []
    idx = 0 if layer is None else int(layer)
    cfg = profile.layer(idx)
    source = "defaults" if path is None else f"{path} layer {idx}"
    if path is not None and cfg.dense:
        notes.append(f"{source} is `dense: true` (the model runs it dense); benching its PBS knobs anyway")
    if cfg.min_seq_len == "auto":
        notes.append("min_seq_len auto: 'pbs' times the sparse path at every length; 'pbs-auto' times what a "
                     "model runs (dense or PBS, whichever pbs_attention measured faster for the shape)")
    elif cfg.min_seq_len:
        notes.append(f"min_seq_len {cfg.min_seq_len}: 'pbs' times the sparse path at every length; below "
                     f"{cfg.min_seq_len} tokens 'pbs-auto' times what a model runs there (pbs_attention's dense "
                     "fallback)")
    return PbsConfig(cfg, source), notes


# ---------------------------------------------------------------------------------------------
# Checks before any work.


def _check(s: BenchSettings) -> None:
    """The settings' own faults, before a device or a file is touched."""
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


def _lengths(s: BenchSettings, device, segment_size: int, notes: list[str]) -> tuple[list, list, list]:
    """(prompt lengths, chunk sizes, varlen lengths) as run: capped on the CPU, checked."""
    seq_lens = list(s.seq_lens)
    if device.type == "cpu":
        note = cpu_cap_note(seq_lens)
        if note is not None:
            notes.append(note)
        seq_lens = list(dict.fromkeys(min(n, CPU_MAX_SEQ_LEN) for n in seq_lens))
    for n in seq_lens:
        if n <= segment_size:
            raise SeqLenNotAboveSegment(n, segment_size)
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
    return seq_lens, chunks, lengths


# ---------------------------------------------------------------------------------------------
# Entry point.


def run_bench(s: BenchSettings, progress: ProgressFn = no_progress) -> BenchReport:
    """Run the attention bench (and the e2e bench with `s.e2e`); returns plain results."""
    _check(s)
    device = resolve_bench_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    profile = load_profile(s.profile)  # the one read of the profile file (e2e applies the same one)
    cfg, notes = pbs_config(profile, s.profile, s.layer)
    seq_lens, chunks, lengths = _lengths(s, device, cfg.layer.segment_size, notes)
    settings = asdict(s) | {"seq_lens": seq_lens, "chunks": chunks, "lengths": lengths}
    report = BenchReport(environment(device, dtype), settings, cfg, s.workload, notes=notes)

    if s.e2e:
        # First: its checks (model, profile fits it) must not wait for the attention bench. The
        # model is freed before the attention bench, which then has the GPU's memory to itself.
        report.e2e, e2e_notes = run_e2e(s, profile, device, progress)
        report.notes.extend(e2e_notes)
    if distributed.ranks().active:
        report.notes.append(f"tensor-parallel run ({distributed.ranks().world} processes): no attention rows; they "
                            "time one GPU's kernels, so run them in one process")
        return report

    captured = {}
    if s.workload == "captured" and s.prompt_rows:
        captured = captured_workloads(s, seq_lens, device, dtype, progress, notes)
    h = Harness(s, cfg, device, dtype, progress)
    replayed = []  # lengths whose pbs row is a CUDA-graph replay (Harness.pbs_kwargs: graph="auto")
    for n in seq_lens if s.prompt_rows else []:
        wl = captured.pop(n, None) or synthetic_workload(s, n, device, dtype)
        if h.timed and auto_worth_it(wl.q):
            replayed.append(format_length(n))
        try:
            report.results.append(prompt_case(h, wl))
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemoryAt(n) from None
        finally:
            del wl
            _free(device)
    if replayed:
        # At 9 / 3 heads, D 64, 8K on an H200 the replay took 0.197 ms and the eager parts 0.195 +
        # 0.147 + 0.140 ms (BENCHMARKS.md section 20): without this note the rows contradict.
        report.notes.append(f"at {', '.join(replayed)} 'pbs' is a CUDA-graph replay (graph=auto, as apply_profile "
                            "runs it); pbs.permute, pbs.select and pbs.attend are each timed eagerly with their own "
                            "host cost, so there they add up to more than 'pbs'")
    try:
        for n in seq_lens if chunks else []:
            wl = synthetic_workload(s, n, device, dtype)
            report.results += [chunk_case(h, wl, c) for c in chunks]
            del wl
            _free(device)
        if lengths:
            seqs = [synthetic_workload(s, n, device, dtype, seed=s.seed + i, batch=1) for i, n in enumerate(lengths)]
            report.results.append(varlen_case(h, seqs))
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemoryAt(max([*seq_lens, *lengths])) from None
    return report
