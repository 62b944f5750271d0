"""Small helpers shared by the ops (launch fitting, backend choice, scale). Block geometry
(`cdiv`) lives below the ops in `pbs_kernels.blocks`, the host-path switch in `pbs_kernels._host`."""
from __future__ import annotations

import math
import os

import torch

from ..blocks import cdiv  # noqa: F401  (re-exported: the Triton launchers import it from here)

LOG2E = 1.4426950408889634


# The launch options that fit, by kernel key (see launch_fitting).
_FITS: dict = {}


MAX_ROW = 8192  # key blocks the Triton selection holds in registers per program (1M tokens at b=128)


def launch_fitting(key, options: list, launch):
    """`launch(option)` with the first of `options` (largest tiles first) whose compiled kernel
    fits the device's shared memory and registers; the pick is remembered per `key` (what sets the
    kernel's size: its constexprs and dtype), so later calls go straight to it.

    Why: shared memory per config is only known once Triton has compiled it, and it differs by
    Triton version (the first H200 run of head dim 256 asked for 328 KiB of the 227 KiB with the
    planned 2-stage tiles). Triton raises OutOfResources when it loads the compiled kernel, before
    anything is launched, so trying the next option is safe. The interpreter never raises it."""
    from triton.runtime.errors import OutOfResources

    err = None
    for i in range(_FITS.get(key, 0) if key is not None else 0, len(options)):
        try:
            out = launch(options[i])
        except OutOfResources as e:
            err = e
            continue
        if key is not None:
            _FITS[key] = i
        return out
    raise err


def fallback_tiles(block_n: int, num_warps: int, num_stages: int) -> list[tuple[int, int, int]]:
    """(BLOCK_N, num_warps, num_stages) to try in turn: the planned tiles, then one stage, then
    half-width key tiles (never under 16 columns, tl.dot's least)."""
    out = []
    for opt in ((block_n, num_warps, num_stages), (block_n, num_warps, 1),
                (max(16, block_n // 2), num_warps, 1), (max(16, block_n // 4), num_warps, 1)):
        if opt not in out:
            out.append(opt)
    return out


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
