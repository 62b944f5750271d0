"""What `pbs bench` is asked to do: `BenchSettings` (the command's options as plain data) and the
CPU pass's length cap. torch-free: the command imports it at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..lengths import format_length
from .baselines import BASELINES

WORKLOADS = ("synthetic", "vertical", "captured")  # the first two: pbs_kernels.workloads.WORKLOADS
E2E_WARMUP, E2E_REPS = 1, 3
CPU_MAX_SEQ_LEN = 2048  # the CPU pass computes fp32 references and eager FlexAttention


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
    baselines: tuple[str, ...] = tuple(BASELINES)  # names in baselines.BASELINES
    seed: int = 0
    max_error: Optional[float] = None  # None: 0.05, or 2e-2 at threshold 1.0
    e2e: bool = False
    fp32_ref_max_len: int = 131072
    e2e_warmup: int = E2E_WARMUP
    e2e_reps: int = E2E_REPS
    chunks: list[int] = field(default_factory=list)  # chunked-prefill rows: the last chunk of each seq_len
    lengths: list[int] = field(default_factory=list)  # one packed varlen batch of these lengths
    prompt_rows: bool = True  # False: only the chunk and varlen rows


def cpu_cap_note(seq_lens) -> Optional[str]:
    """What the CPU pass does to lengths above CPU_MAX_SEQ_LEN (None when none is)."""
    over = [n for n in seq_lens if n > CPU_MAX_SEQ_LEN]
    if not over:
        return None
    return (f"cpu: {', '.join(format_length(n) for n in over)} token(s) capped to {format_length(CPU_MAX_SEQ_LEN)}, "
            f"the CPU pass's limit (correctness only, no timing); run on a GPU for longer lengths")
