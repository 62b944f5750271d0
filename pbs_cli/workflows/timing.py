"""GPU timing helpers shared by `pbs bench` and `pbs tune`.

    ms = time_ms(lambda: pbs_attention(q, k, v))          # median of triton's do_bench
    run = sdpa_runner("cudnn", q, k, v)                    # dense causal SDPA on one backend
    if run.available: ms = time_ms(run)
    name, ms = fastest_dense_ms(q, k, v)                   # the speedup's denominator

torch and triton are imported inside the functions: `pbs_cli` modules import this one at top
level and `pbs --help` must not pay for torch.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

# Dense SDPA backends by CLI name -> torch.nn.attention.SDPBackend member.
SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
# The speedup's denominator (docs/design.md, Metrics): the fastest of these that runs.
FAST_DENSE = ("cudnn", "flash")


def time_ms(fn: Callable[[], Any], *, warmup: float = 25.0, rep: float = 100.0, min_reps: int = 5) -> float:
    """Median milliseconds of `fn()` on the current CUDA device, by `triton.testing.do_bench`.

    do_bench sizes its loops from `warmup` and `rep` (milliseconds). For slow calls (dense
    attention at 128K takes 250-450 ms) those budgets amount to a single sample, so `rep` is
    raised to at least `min_reps` calls and `warmup` to one call, from a first timed call, which
    also absorbs compilation and autotuning.
    """
    import torch
    from triton.testing import do_bench

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()  # compile / autotune / allocator warm-up, untimed
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    kwargs: dict[str, Any] = {"warmup": max(float(warmup), first), "rep": max(float(rep), min_reps * first)}
    # do_bench(fn, warmup, rep, grad_to_none, quantiles, return_mode) in triton 3.x (3.9
    # inspected); should a version lack return_mode, quantiles=[0.5] gives the median too.
    # Decided by signature, not by version string.
    params = inspect.signature(do_bench).parameters
    if "return_mode" in params:
        kwargs["return_mode"] = "median"
        result = do_bench(fn, **kwargs)
    else:
        result = do_bench(fn, quantiles=[0.5], **kwargs)
    if isinstance(result, (list, tuple)):
        result = result[0]
    return float(result)


# Host-side CUDA API calls that start work on the GPU (kernels, graph launches, copies, fills), as
# torch.profiler names them.
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaMemcpy", "cudaMemset",
                "cudaLaunchCooperativeKernel")


def call_cost(fn: Callable[[], Any], *, reps: int = 10, host_calls: int = 30) -> dict:
    """What one call of `fn` costs beside its GPU time (issue 22): CUDA launch API calls and
    kernel microseconds per call (torch.profiler over `reps` calls), host microseconds per call
    (`host_calls` back-to-back calls timed before the final synchronize: what the CPU spends
    issuing them) and wall microseconds per call (with the synchronize)."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    launches = 0
    gpu_us = 0.0
    for e in prof.events():
        if e.name.startswith(LAUNCH_CALLS):
            launches += 1
        if e.device_type == torch.autograd.DeviceType.CUDA:
            gpu_us += e.time_range.elapsed_us()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(host_calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return dict(launches=launches / reps, gpu_us=gpu_us / reps, host_us=(t1 - t0) / host_calls * 1e6,
                wall_us=(t2 - t0) / host_calls * 1e6)


@dataclass
class SdpaRun:
    """A ready-to-time dense causal attention call on one SDPA backend.

    Call it for the output. `available` is False (and `reason` says why, in one line) when the
    backend cannot run these inputs on this machine; calling it then raises RuntimeError.
    """

    name: str
    fn: Optional[Callable[[], Any]]
    reason: Optional[str] = None

    @property
    def available(self) -> bool:
        return self.fn is not None

    def __call__(self):
        if self.fn is None:
            raise RuntimeError(f"SDPA backend {self.name} is unavailable: {self.reason}")
        return self.fn()


def expand_kv(q, k, v):
    """K and V with one head per query head (GQA copies), for backends without native GQA.
    Done once, outside any timed region; returns k, v unchanged when heads already match."""
    G = q.shape[1] // k.shape[1]
    if G == 1:
        return k, v
    return k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)


def sdpa_runner(name: str, q, k, v, *, scale: float | None = None, check: bool = True) -> SdpaRun:
    """Dense causal SDPA restricted to backend `name` (cudnn | flash | efficient | math).

    k and v may have fewer heads than q (grouped-query attention); they are expanded here, once,
    so the timed call is the backend's kernel alone. Pass already-expanded k/v (`expand_kv`) to
    share one copy between backends. With `check`, the call runs once to find out whether the
    backend accepts these inputs; a refusal becomes `reason`, not an exception.
    """
    import torch
    import torch.nn.functional as F

    if name not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {name!r}; use one of {', '.join(SDPA_BACKENDS)}")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return SdpaRun(name, None, f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel")
    backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    if backend is None:
        return SdpaRun(name, None, f"torch {torch.__version__} has no {name} SDPA backend")
    if name != "math" and q.device.type != "cuda":
        return SdpaRun(name, None, "needs a CUDA GPU")
    k, v = expand_kv(q, k, v)

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    if check:
        reason = _try(run)
        if reason is not None:
            return SdpaRun(name, None, reason)
    return SdpaRun(name, run)


def _try(fn: Callable[[], Any]) -> Optional[str]:
    """None when fn() runs; else one line saying why not (SDPA explains refusals in warnings)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return None
        except (RuntimeError, NotImplementedError, ValueError) as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
                return "out of GPU memory"
            # The warnings carry the backend's reasons ("Flash attention requires ..."); the
            # exception itself only says "No available kernel".
            from .errors import summary

            reasons = [summary(str(w.message)) for w in caught if str(w.message).strip()]
            return reasons[0] if reasons else summary(e)


def fastest_dense_ms(q, k, v, *, scale: float | None = None, names=FAST_DENSE,
                     warmup: float = 25.0, rep: float = 100.0) -> tuple[str, float]:
    """(backend, median ms) of the fastest available dense SDPA backend among `names`.
    Raises RuntimeError when none runs."""
    k, v = expand_kv(q, k, v)
    best: tuple[str, float] | None = None
    reasons = []
    for name in names:
        run = sdpa_runner(name, q, k, v, scale=scale)
        if not run.available:
            reasons.append(f"{name}: {run.reason}")
            continue
        ms = time_ms(run, warmup=warmup, rep=rep)
        if best is None or ms < best[1]:
            best = (name, ms)
    if best is None:
        raise RuntimeError("no dense SDPA backend runs here (" + "; ".join(reasons) + ")")
    return best


def bench_budget(seq_len: int) -> tuple[float, float]:
    """(warmup_ms, rep_ms) for do_bench at this length: short calls get do_bench's defaults,
    long ones the minimum (time_ms still takes `min_reps` samples), so that a bench of
    8k,32k,128k stays within a few minutes."""
    if seq_len >= 65536:
        return 10.0, 50.0
    return 25.0, 100.0
