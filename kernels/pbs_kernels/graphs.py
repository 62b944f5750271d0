"""Whole-call CUDA graphs for pbs_attention: one capture per (shapes, dtype, device, settings),
replayed on later calls by copying their inputs into the capture's own buffers.

Why: at 9 query / 3 KV heads, D 64, 8K tokens one call is ~19 launches and ~320 us of GPU work
inside ~1060 us of wall time (H200, issue 22): the host (Python, Triton's launcher) is the cost.
A replay is a handful of launches (one multi-tensor copy of the inputs, the graph, the output
copy) whatever the pipeline holds, and a call seen before skips its checks
(`attention._replay_known`).

    out = pbs_attention(q, k, v, graph=True)     # capture on the first call of a shape
    out = pbs_attention(q, k, v, graph="auto")   # run eagerly once, capture on the second call

The eager run before a capture also JIT-compiles and autotunes the Triton kernels and fills the
runtime's one-time probes, none of which may happen inside a capture. Calls that need the host in
the middle (statistics, a prefix cache, gradients, the torch backend, CPU tensors, packed varlen
batches with cu_seqlens read on the host) run eagerly; so does a key whose capture failed once.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from . import _host


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: tuple  # static input buffers (None where the call has no such input)
    out: torch.Tensor  # static output, rewritten by every replay
    dsts: list | None = None  # the inputs that are not None, for one multi-tensor copy


# One multi-tensor launch for a replay's 3-4 input copies instead of one `copy_` launch each
# (torch._foreach_copy_, in torch since 2.1; a source of another dtype or layout takes its
# per-tensor path inside the op). None: the per-tensor loop.
_FOREACH_COPY = getattr(torch, "_foreach_copy_", None)
# Above this size of the first input (q) the multi-tensor copy splits into many launches and
# costs more host time than a copy per input (H200, torch 2.11, BENCHMARKS section 19: q of
# 1 GiB 41 launches and 335 us against 5 and 157; q of 128-256 MiB 126-150 us against 208-225).
FOREACH_MAX_BYTES = 256 << 20


def copy_inputs(dsts: list, srcs: list) -> None:
    """dst.copy_(src) for each pair: one `_foreach_copy_` where torch has it (and not under
    PBS_LEGACY_HOST) for inputs up to FOREACH_MAX_BYTES, else one copy_ per tensor."""
    if _FOREACH_COPY is not None and not _host.LEGACY_HOST and dsts[0].nbytes <= FOREACH_MAX_BYTES:
        _FOREACH_COPY(dsts, srcs)
        return
    for dst, src in zip(dsts, srcs):
        dst.copy_(src)


class PbsGraphs:
    """A bounded (least recently used) cache of captured pbs_attention calls.

    max_graphs: captures kept; each holds its call's intermediates in its own memory pool (at
    128K tokens, 32 heads, D 128 about 0.7 GB: permuted K/V, scores and the block list), so the
    bound is a memory bound. Counters `captures`, `replays`, `eager` say what happened.
    """

    def __init__(self, max_graphs: int = 8):
        self.max_graphs = max_graphs
        self._graphs: OrderedDict = OrderedDict()
        self._seen: OrderedDict = OrderedDict()  # keys called once under "auto"
        self.failed: dict = {}  # key -> why its capture failed (it runs eagerly)
        # pbs_attention's calls that went through this cache: (shapes, dtypes, devices, settings,
        # graph mode) -> what `_attention` worked out for them (graph key, fn, ...), so that the
        # next such call skips its checks and key build (`attention._replay_known`). Kept here so
        # that a new cache (or clear()) forgets them with the graphs.
        self.calls: dict = {}
        self.captures = self.replays = self.eager = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key) -> bool:
        return key in self._graphs

    def clear(self) -> None:
        self._graphs.clear()
        self.calls.clear()
        self._seen.clear()
        self.failed.clear()

    def remember(self, call_key, value) -> None:
        """Keep what `_attention` worked out for a call that ran through this cache (bounded)."""
        if len(self.calls) > 4096:
            self.calls.clear()
        self.calls[call_key] = value

    def discard(self, key) -> None:
        self._graphs.pop(key, None)

    def run(self, key, fn: Callable[..., torch.Tensor], inputs: tuple, *, auto: bool = False) -> torch.Tensor:
        """fn(*inputs) through the graph of `key`: replayed when captured, captured now when not
        (under `auto` only from the key's second call). Returns a fresh tensor."""
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            if _host.LEGACY_HOST:
                for dst, src in zip(entry.inputs, inputs):
                    if dst is not None:
                        dst.copy_(src)
            else:  # the key holds which inputs are None (sinks), so the lists pair up
                copy_inputs(entry.dsts, [t for t in inputs if t is not None])
            entry.graph.replay()
            self.replays += 1
            return entry.out.clone()
        if key in self.failed or (auto and not self._seen_before(key)):
            self.eager += 1
            return fn(*inputs)
        entry = self._capture(key, fn, inputs)
        if entry is None:
            self.eager += 1
            return fn(*inputs)
        entry.graph.replay()
        return entry.out.clone()

    def _seen_before(self, key) -> bool:
        if key in self._seen:
            return True
        self._seen[key] = True
        if len(self._seen) > 1024:
            self._seen.popitem(last=False)
        return False

    def _capture(self, key, fn, inputs) -> _Entry | None:
        device = next(t.device for t in inputs if t is not None)
        # Buffers in the inputs' own layout (empty_like keeps a dense view's strides, e.g. the
        # transposed [B, heads, N, D] views transformers passes): a later call of that layout
        # copies in with the same strides, which _foreach_copy_'s one-launch CUDA route needs.
        static = tuple(None if t is None else (torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t)
                                               if _host.LEGACY_HOST else torch.empty_like(t, device=device).copy_(t))
                       for t in inputs)
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            fn(*static)  # JIT, autotuning and one-time probes happen here, outside the capture
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = fn(*static)
        except RuntimeError as err:  # something in the pipeline cannot be captured: stay eager
            reason = str(err).splitlines()[0]
            self.failed[key] = reason
            warnings.warn(f"pbs: CUDA graph capture failed ({reason}); this shape runs eagerly", RuntimeWarning,
                          stacklevel=4)
            return None
        entry = _Entry(graph, static, out, [t for t in static if t is not None])
        self._graphs[key] = entry
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry


# graph="auto" captures only calls whose q holds at most this many bytes. A replay copies q, k, v
# in and the output out (about 2.5x q's bytes each way for grouped heads); at 64 MiB that is
# ~0.1 ms on an H200 (~4 TB/s), less than the ~0.7 ms of host time it saves (issue 22: 9 / 3
# heads, D 64, 8K). Above it the GPU work (2 ms and more: 32 / 8 heads, D 128, 32K) already
# hides the host, and the copies would only add time. graph=True captures at any size.
AUTO_MAX_Q_BYTES = 64 << 20


def auto_worth_it(q: torch.Tensor) -> bool:
    """Whether graph="auto" captures a call with this q."""
    return q.numel() * q.element_size() <= AUTO_MAX_Q_BYTES


_DEFAULT: PbsGraphs | None = None


def pbs_graphs() -> PbsGraphs:
    """The process's graph cache that `pbs_attention(..., graph=...)` uses."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PbsGraphs()
    return _DEFAULT


GRAPH_MODES = (False, True, "auto")


def check_graph_mode(where: str, graph) -> None:
    """ValueError unless `graph` is one of GRAPH_MODES (pbs_attention, varlen, apply_profile)."""
    if graph not in GRAPH_MODES:
        raise ValueError(f"{where}: graph {graph!r} must be False, True or 'auto'")


def why_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, *, return_stats: bool,
              cache, auto: bool = False) -> str | None:
    """Why a pbs_attention call cannot be captured (None when it can)."""
    if not q.is_cuda:
        return "CPU tensors"
    return why_eager_on_device(q, k, v, backend, return_stats=return_stats, cache=cache, auto=auto)


def why_eager_on_device(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, *, return_stats: bool,
                        cache, auto: bool = False) -> str | None:
    """why_eager's answer without the device check (the CPU tests and scripts/cpu_host_path.py
    run the graph path on CPU tensors through it)."""
    if backend == "torch":
        return "torch backend"
    if return_stats:
        return "statistics are read on the host"
    if cache is not None:
        return "a prefix cache is updated on the host"
    if needs_grad(q, k, v):
        return "gradients"
    if auto and not auto_worth_it(q):
        return "graph='auto' and a large call (the GPU work hides the host)"
    if capturing(q):
        return "already inside a capture"  # the caller's own graph records the launches
    return None


def needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the call records gradients (checked on every call: it can change between calls)."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def capturing(q: torch.Tensor) -> bool:
    """Whether a CUDA graph capture is open on q's device (checked on every call)."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()
