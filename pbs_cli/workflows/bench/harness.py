"""What every bench case measures with: the tolerances a row is gated on, the work of dense and
sparse attention in flops, the sampled-row kernel error, and `Harness`, one run's rules for
timing a row, gating it and crediting speedups. The cases (prompt.py, serving.py) and the
baseline registry (baselines.py) import it; it imports none of them.

torch-free at import (baselines.py, which the command reads for --baselines, imports it): the
timing functions are looked up on `workflows.timing` at call time, which imports torch itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from pbs_kernels.metrics import output_error as rel_error

from .. import timing
from ..progress import ProgressFn
from .results import FAILED, OK, UNAVAILABLE, MethodResult, PbsConfig, SeqLenResult, is_part

DENSE_TOL = 2e-2  # a dense backend vs the fp32 reference, bf16/fp16
# PBS rows at threshold < 1: an absolute floor on the output error for a speedup to count, not
# a promise of the threshold. tau promises kept mass: a true dropped mass of at most (1 - tau) of
# the row's earlier mass (dropped / allowed 0.55-0.92 in every synthetic row measured with the
# default rule, D 64 and 128; up to 1.05 with estimator top). The output error is that drop
# times the inputs' error per dropped mass (0.6-1.2 on the bench workload, 0.85-10 on
# SmolLM2-135M's layers), so a gate derived from tau (recall >= tau) would pass any tau, and a
# speedup at any accuracy. 9 / 3 heads, 8K, tau 0.9, fp32 CPU, seeds 0-3 (scripts/cpu_d64_gate.py,
# BENCHMARKS.md section 17): D 128 2.5-3.6%; D 64 3.4-5.0% before the workload's positional code
# was made exact below D 128, 2.6-4.6% after (tau 0.93: 2.0-3.4%).
MAX_ERROR = 0.05
KERNEL_TOL = {"fp32": 1e-3, "low": 2e-2}
N_CHECK_BLOCKS = 6  # query blocks sampled for kernel_error


def causal_flops(batch: int, heads: int, head_dim: int, n: int) -> float:
    """Exact dense causal attention work: 4*D flops per allowed (query, key) pair."""
    return 2.0 * batch * heads * head_dim * n * (n + 1)


def tile_flops(tiles: int, block_size: int, head_dim: int) -> float:
    """Work of `tiles` computed b x b tiles (summed over batch and query heads)."""
    return 4.0 * block_size * block_size * head_dim * tiles


def plan_flops(blocks, head_dim: int, segment_size: int, vertical_keys: int) -> float:
    """Work of a plan: its computed tiles, plus 4 * b * D flops per (query row, vertical key)."""
    b = blocks.block_size
    flops = tile_flops(int(blocks.tiles_per_head().sum()), b, head_dim)
    if vertical_keys:
        flops += 4.0 * b * head_dim * float(blocks.vertical_keys_per_head(segment_size, vertical_keys).sum())
    return flops


def check_blocks(num_blocks: int, block_size: int, segment_size: int, count: int = N_CHECK_BLOCKS) -> list[int]:
    """Query blocks sampled for kernel_error: spread over the sequence, the last one included
    (it keeps the most tiles), none in the first segment (dense there anyway)."""
    first = min(num_blocks - 1, segment_size // block_size)
    if num_blocks - first <= count:
        return list(range(first, num_blocks))
    step = (num_blocks - 1 - first) / (count - 1)
    return sorted({first + round(i * step) for i in range(count)})


def kernel_error(out, ref_rows, rows) -> float:
    return rel_error(out[:, :, rows], ref_rows)


# ---------------------------------------------------------------------------------------------
# Registry entries: what a case's baseline rows are made of.


@dataclass(frozen=True)
class Dense:
    """A dense-attention baseline of a case: gated at DENSE_TOL against the fp32 reference, and a
    candidate for the speedup's denominator. `call(case)` returns a no-argument call of it on the
    case's inputs, a one-line reason it cannot run here (an `unavailable` row), or None when it
    does not apply to the case's shape (no row). `row`: the method name, when not the entry's key."""

    call: Callable[[Any], Union[Callable[[], Any], str, None]]
    row: Optional[str] = None


@dataclass(frozen=True)
class Sparse:
    """A baseline compared with PBS after PBS's own rows: `rows(case)` returns its rows, gated
    (the case holds PBS's plan, its rows and the reference for it to reuse)."""

    rows: Callable[[Any], list[MethodResult]]


# ---------------------------------------------------------------------------------------------
# One run's rules.


class Harness:
    """How rows of one run are timed, gated and credited: the device, the backend the PBS rows
    run on, the tolerances, the benched layer's settings and the progress callback."""

    def __init__(self, s, cfg: PbsConfig, device, dtype, progress: ProgressFn):
        self.s, self.cfg, self.layer = s, cfg, cfg.layer
        self.device, self.dtype, self.progress = device, dtype, progress
        self.timed = device.type == "cuda"
        # The pbs row's timing.call_cost (torch.profiler's CUDA activity, CUDA syncs): the GPU's too.
        self.profiled = self.timed
        self.backend = "triton" if self.timed else "torch"
        # The bench runs fp32, bf16 or fp16: 4 bytes is fp32.
        self.kernel_tol = KERNEL_TOL["fp32"] if dtype.itemsize == 4 else KERNEL_TOL["low"]
        self.max_error = s.max_error if s.max_error is not None else (MAX_ERROR if self.layer.threshold < 1.0 else 2e-2)

    def pbs_kwargs(self, **override) -> dict:
        """pbs_attention's keywords for the benched layer on this run's backend, its min_seq_len
        included (override min_seq_len=0 for the sparse path at every length), and graph="auto"
        as apply_profile runs it: a call with q of at most 64 MiB is replayed from a CUDA graph
        from its third call on (the first two, eager and capture, are timing.time_ms's untimed
        call and the one that sizes its loops, outside the median), larger ones and the CPU run
        eagerly (pbs_kernels.graphs)."""
        return {**self.layer.plan_kwargs(), "min_seq_len": self.layer.min_seq_len, "backend": self.backend,
                "graph": "auto", **override}

    def steps(self, desc: str, total: int) -> Callable[[], None]:
        """Report `desc` at 0 of `total` now; each call of the returned function is one more done."""
        done = 0
        self.progress(desc, 0, total)

        def step() -> None:
            nonlocal done
            done += 1
            self.progress(desc, done, total)

        return step

    # -- timing --------------------------------------------------------------------------

    def time(self, fn: Callable[[], Any], n: int) -> Optional[float]:
        """Median ms of `fn()` (timing.time_ms with the budget for n tokens); None on the CPU."""
        if not self.timed:
            return None
        warmup, rep = timing.bench_budget(n)
        return timing.time_ms(fn, warmup=warmup, rep=rep)

    # -- gates ---------------------------------------------------------------------------

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

    @staticmethod
    def gate_dense(row: MethodResult, error: float, reference: str) -> MethodResult:
        """A dense row's error vs the reference; FAILED above DENSE_TOL."""
        row.error = error
        if not error <= DENSE_TOL:
            row.status, row.note = FAILED, f"error {error:.3g} > {DENSE_TOL:g} vs the {reference} reference"
        return row

    def measure(self, name: str, call: Callable[[], Any], ref, n: int, *, dense: bool,
                unavailable_on: tuple = (), **fields) -> MethodResult:
        """Run `call` once, compare its output with the fp32 `ref`, time it, gate it (as a dense row
        or as a sparse one). An exception of `unavailable_on` makes an `unavailable` row."""
        try:
            out = call()
        except unavailable_on as e:  # a backend that does not take these shapes
            return MethodResult(name, UNAVAILABLE, note=str(e).splitlines()[0][:160])
        row = MethodResult(name, OK, **fields)
        error = rel_error(out, ref)
        del out
        row.ms = self.time(call, n)
        if dense:
            return self.gate_dense(row, error, "fp32")
        row.error = error
        return self.gate(row)


# ---------------------------------------------------------------------------------------------
# Speedups: one definition for every case.


def fastest(rows: dict[str, MethodResult]) -> Optional[str]:
    """The key of the fastest dense row that passed and was timed (the speedup's denominator)."""
    timed = {key: r for key, r in rows.items() if r.status == OK and r.ms}
    return min(timed, key=lambda key: timed[key].ms) if timed else None


def credit(result: SeqLenResult) -> SeqLenResult:
    """TFLOP/s of every timed row that counts its flops, and speedup = the fastest dense row's
    time / the row's time for every row that passed (parts of a pipeline excluded)."""
    base = result.fastest_dense_ms
    for row in result.methods:
        if row.ms and row.flops:
            row.tflops = row.flops / (row.ms * 1e-3) / 1e12
        if row.status == OK and row.ms and base and not is_part(row.method):
            row.speedup = base / row.ms
    return result
