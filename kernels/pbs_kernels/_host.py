"""Switches of the per-call host path, below every other module (geometry and ops read them).

LEGACY_HOST: the per-call host path before issue 22 (no cached checks, torch ops for the score
LSE, the block pooling and the sink's dtype, no cached device queries; for a graph replay one
copy_ per input, contiguous capture buffers and no known-call lookup), kept so that one process
can time both (scripts/gpu_fixed_cost.py sets `pbs_kernels._host.LEGACY_HOST`; PBS_LEGACY_HOST=1
sets it at import). Readers look it up here at call time (`_host.LEGACY_HOST`), never copy it.
"""
from __future__ import annotations

import os

LEGACY_HOST = os.environ.get("PBS_LEGACY_HOST", "0") == "1"
