"""Small helpers shared by the ops (geometry of blocks and segments, backend choice)."""
from __future__ import annotations

import math
import os

import torch

LOG2E = 1.4426950408889634

# The per-call host path before issue 22 (no cached checks, torch ops for the score LSE, the
# block pooling and the sink's dtype, no cached device queries), kept so that one process can
# time both (scripts/gpu_fixed_cost.py sets it; PBS_LEGACY_HOST=1 sets it at import).
LEGACY_HOST = os.environ.get("PBS_LEGACY_HOST", "0") == "1"


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (tests, CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    return t.is_cuda or interpreting()


def resolve_backend(backend: str, t: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if t.is_cuda else "torch"
    if backend == "triton" and not triton_usable(t):
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); "
            "use backend='torch' or 'auto'"
        )
    return backend


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
