"""Allowed values of PBS's knobs, in one torch-free place.

The CLI (option checks), the profile loader and the runtime all import these, so `pbs --help` and
`pbs profile validate` need no torch, and the three can never disagree.
"""
from __future__ import annotations

BLOCK_SIZES = (16, 32, 64, 128)  # 16/32 only make sense for tiny CPU models
HEAD_DIMS = (64, 128)
BACKENDS = ("auto", "triton", "torch")
