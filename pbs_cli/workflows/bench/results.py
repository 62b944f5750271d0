"""`pbs bench`'s results: plain data, torch-free (the command imports it for --help).

The JSON document, results.csv, results.md and the plot are rendered from these (render.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from pbs_kernels.profile import LayerConfig

OK, FAILED, UNAVAILABLE, SKIPPED = "ok", "FAILED", "unavailable", "skipped"


def is_part(method: str) -> bool:
    """pbs.permute, pbs.attend, flex.attend...: a part of a pipeline, timed alone, never credited
    with a speedup (the plot draws them dashed)."""
    return "." in method


@dataclass
class EnvInfo:
    device: str  # GPU name, or "cpu"
    cuda: Optional[str]
    cudnn: Optional[str]
    torch: str
    triton: Optional[str]
    transformers: Optional[str]
    dtype: str
    timing: str
    ranks: int = 1  # tensor-parallel processes (torchrun); 1: one process


class PbsConfig:
    """The PBS settings benched: one layer's LayerConfig whole (the profile's layer, or the
    method defaults) and where it came from. In the JSON document it is the layer's settings
    with `source` (`dense` left out: the bench times the layer's PBS settings either way, and a
    note says when the profile runs the layer dense)."""

    __slots__ = ("layer", "source")

    def __init__(self, layer: LayerConfig, source: str):
        self.layer, self.source = layer, source  # source: "defaults" or "PATH layer L"

    def __eq__(self, other) -> bool:
        return isinstance(other, PbsConfig) and (self.layer, self.source) == (other.layer, other.source)

    def __repr__(self) -> str:
        return f"PbsConfig({self.layer!r}, {self.source!r})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self.layer):
            if f.name != "dense":
                out[f.name] = getattr(self.layer, f.name)
            if f.name == "permute":
                out["source"] = self.source  # where results.json has always had it
        return out


@dataclass
class MethodResult:
    method: str
    status: str  # ok | FAILED | unavailable | skipped
    ms: Optional[float] = None
    flops: Optional[float] = None
    tflops: Optional[float] = None
    density: Optional[float] = None
    recall: Optional[float] = None
    error: Optional[float] = None
    kernel_error: Optional[float] = None
    speedup: Optional[float] = None
    # oracle tiles at this row's recall / tiles computed (pbs_kernels.metrics.selection_efficiency)
    selection_efficiency: Optional[float] = None
    note: Optional[str] = None


@dataclass
class SeqLenResult:
    seq_len: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    reference: str  # "fp32" or the dense backend whose output served as reference
    fastest_dense: Optional[str]
    fastest_dense_ms: Optional[float]
    methods: list[MethodResult] = field(default_factory=list)
    case: Optional[str] = None  # serving rows: "chunk 8K of 128K", "varlen 4K+16K"; None: whole prompt
    # One eager "pbs" call beside its GPU time (timing.call_cost: launches, host_us, gpu_us,
    # wall_us per call); None without a GPU
    pbs_call: Optional[dict] = None

    def method(self, name: str) -> Optional[MethodResult]:
        return next((m for m in self.methods if m.method == name), None)


@dataclass
class E2EResult:
    seq_len: int
    ttft_dense_ms: Optional[float]
    ttft_pbs_ms: Optional[float]
    speedup: Optional[float]
    note: Optional[str] = None
    # ||l_pbs - l_dense|| / ||l_dense|| of the first token's logits (fp32): the timed runs' output
    # agrees with dense, or the speedup is of a wrong answer. 0 for a profile at threshold 1.0.
    logits_error: Optional[float] = None
    same_token: Optional[bool] = None  # both pick the same first token (greedy)


@dataclass
class BenchReport:
    env: EnvInfo
    settings: dict[str, Any]
    pbs: PbsConfig
    workload: str
    results: list[SeqLenResult] = field(default_factory=list)
    e2e: list[E2EResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [f"{r.seq_len}:{m.method}" for r in self.results for m in r.methods if m.status == FAILED]


CSV_COLUMNS = ("seq_len", "method", "status", "ms", "tflops", "density", "recall", "error",
               "kernel_error", "speedup", "selection_efficiency", "reference", "note", "case")


def csv_rows(report: BenchReport) -> list[dict[str, Any]]:
    """One row per (seq_len, method), then the e2e rows (method ttft-dense / ttft-pbs)."""
    rows = []
    for r in report.results:
        for m in r.methods:
            rows.append({"seq_len": r.seq_len, "method": m.method, "status": m.status, "ms": m.ms,
                         "tflops": m.tflops, "density": m.density, "recall": m.recall, "error": m.error,
                         "kernel_error": m.kernel_error, "speedup": m.speedup,
                         "selection_efficiency": m.selection_efficiency, "reference": r.reference,
                         "note": m.note, "case": r.case})
    for e in report.e2e:
        for method, ms, sp, err in (("ttft-dense", e.ttft_dense_ms, None, None),
                                    ("ttft-pbs", e.ttft_pbs_ms, e.speedup, e.logits_error)):
            rows.append({"seq_len": e.seq_len, "method": method, "status": OK if ms is not None else SKIPPED,
                         "ms": ms, "speedup": sp, "error": err, "note": e.note})
    return rows
