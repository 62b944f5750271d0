"""`pbs bench`'s settings and results: plain data, torch-free (the command imports it for --help).

The JSON document, results.csv and results.md are written from these by the command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

BASELINES = ("cudnn", "flash", "efficient", "flex", "noperm")
WORKLOADS = ("synthetic", "vertical", "captured")  # the first two: pbs_kernels.workloads.WORKLOADS
E2E_WARMUP, E2E_REPS = 1, 3

OK, FAILED, UNAVAILABLE, SKIPPED = "ok", "FAILED", "unavailable", "skipped"


# ---------------------------------------------------------------------------------------------
# Settings and results (plain data).


@dataclass
class BenchSettings:
    """What to bench. Mirrors `pbs bench`'s options; see the command's help."""

    seq_lens: list[int]
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    batch: int = 1
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cuda | cpu
    workload: str = "synthetic"  # synthetic | vertical | captured
    model: Optional[str] = None
    layer: Optional[int] = None
    profile: Optional[str] = None  # path of a profile YAML
    baselines: tuple[str, ...] = BASELINES
    seed: int = 0
    max_error: Optional[float] = None  # None: 0.05, or 2e-2 at threshold 1.0
    e2e: bool = False
    fp32_ref_max_len: int = 131072
    e2e_warmup: int = E2E_WARMUP
    e2e_reps: int = E2E_REPS
    chunks: list[int] = field(default_factory=list)  # chunked-prefill rows: the last chunk of each seq_len
    lengths: list[int] = field(default_factory=list)  # one packed varlen batch of these lengths
    prompt_rows: bool = True  # False: only the chunk and varlen rows


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


@dataclass
class PbsConfig:
    """The PBS knobs benched (from the profile's layer, or the method defaults)."""

    block_size: int
    segment_size: int
    threshold: float
    permute: bool
    source: str  # "defaults" or "PATH layer L"
    min_seq_len: int | str = 0  # below it (or "auto") a model may run dense: the "pbs-auto" row times that path
    estimator: str = "mean"
    threshold_mass: str = "earlier"
    vertical_keys: int = 0

    def runtime_kwargs(self) -> dict:
        """The pbs_attention keywords of these knobs (min_seq_len included)."""
        return dict(block_size=self.block_size, segment_size=self.segment_size, threshold=self.threshold,
                    permute=self.permute, min_seq_len=self.min_seq_len, estimator=self.estimator,
                    threshold_mass=self.threshold_mass, vertical_keys=self.vertical_keys)


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
