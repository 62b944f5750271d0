"""What a PBS setting costs, relative to dense attention on the same layer (dense = 1.0).

Two ways, never mixed in one study:

* measured (CUDA): median kernel time of `pbs_attention` (permutation + selection + attend)
  over the time of the fastest dense SDPA backend, same GPU, same process (docs/design.md, Metrics);
* predicted (CPU, where timings say nothing about a GPU): a cost model from the tile density,
  labelled "predicted" everywhere it is shown.

The model: PBS computes a fraction `density` of the causal tiles at a per-tile efficiency
`e(b)` relative to the fastest dense kernel (docs/design.md, Performance: time = density / e), plus the work
done before attending: scoring keys against the last b queries (2b/N of the dense work, at a
lower efficiency) and a fixed share for the sort, the block selection and the launches.
"""

from __future__ import annotations

from typing import Callable

__all__ = [
    "ATTEND_EFFICIENCY",
    "COST_MODELS",
    "dense_time_ms",
    "kernel_time_ms",
    "pbs_time_ms",
    "predicted_cost",
]

COST_MODELS = ("predicted", "measured")

# Per-tile speed of the PBS attend kernel relative to the fastest dense kernel (cuDNN), by tile
# edge. b=128: measured 400-437 TFLOP/s on computed tiles on an H200 against ~560 for cuDNN
# (the attend kernel's tuning note) -> 0.75. Smaller tiles do less work per loaded key block and
# per program; 64 is an estimate until `pbs bench` measures it, 16/32 exist for tiny CPU models.
ATTEND_EFFICIENCY = {128: 0.75, 64: 0.6, 32: 0.4, 16: 0.25}
# Key scoring is a small skinny matmul (b queries x N keys) that runs far below peak.
SCORE_EFFICIENCY = 0.3
# Sorting inside segments, pooling and top-p selection, and kernel launches: a fixed share of
# the dense time of a long-prompt layer (a few hundred microseconds against tens of ms at 32K).
PERMUTE_OVERHEAD = 0.015
SELECT_OVERHEAD = 0.02


def predicted_cost(*, block_size: int, permute: bool, density: float, n_tokens: int) -> float:
    """Predicted PBS time / dense time for one layer at `density` (computed / causal tiles)."""
    if block_size not in ATTEND_EFFICIENCY:
        raise ValueError(f"predicted_cost: no efficiency for block_size {block_size}")
    cost = density / ATTEND_EFFICIENCY[block_size] + SELECT_OVERHEAD
    if permute:
        # Dense causal work is ~N^2/2 query-key pairs; scoring is b*N of them.
        cost += 2.0 * block_size / max(n_tokens, 1) / SCORE_EFFICIENCY + PERMUTE_OVERHEAD
    return cost


# do_bench budgets (ms). Each trial is timed once to rank it against the others, so a short
# measurement does (a PBS call at 32K takes a few ms; +-3% noise is below the gaps that matter);
# the held-out figures of the chosen profile get timing.time_ms's full default budget.
QUICK = {"warmup": 5.0, "rep": 40.0, "min_reps": 5}


def kernel_time_ms(fn: Callable[[], object], *, quick: bool = False) -> float:
    """Median time of `fn()` in ms on the current CUDA device (pbs_cli.workflows.timing.time_ms)."""
    from ..timing import time_ms

    return float(time_ms(fn, **QUICK) if quick else time_ms(fn))


def pbs_time_ms(q, k, v, *, quick: bool = False, **kwargs) -> float:
    """Median time of `pbs_attention(q, k, v, **kwargs)` in ms as `apply_profile` runs it by
    default: graph="auto", so a call small enough to be host-bound is a CUDA-graph replay (about
    50 us of host time instead of 690 at 9 / 3 heads, D 64, 8K on an H200, BENCHMARKS section 20:
    timed eagerly every sparse setting of SmolLM2-135M at 8K looked slower than dense, "1.00x";
    timed as it runs, tune found 1.11x). The first call runs eagerly here; the second, which
    captures, is time_ms's untimed call, so the timing sees replays."""
    from pbs_kernels.attention import pbs_attention

    def call():
        return pbs_attention(q, k, v, graph="auto", **kwargs)

    call()
    return kernel_time_ms(call, quick=quick)


def dense_time_ms(q, k, v, *, scale: float | None = None, quick: bool = False) -> tuple[float, str]:
    """(time in ms, backend name) of the fastest dense causal SDPA backend for these inputs
    (cuDNN or flash, docs/design.md, Metrics)."""
    from ..timing import fastest_dense_ms

    budget = {"warmup": QUICK["warmup"], "rep": QUICK["rep"]} if quick else {}
    name, ms = fastest_dense_ms(q, k, v, scale=scale, **budget)
    return float(ms), name
