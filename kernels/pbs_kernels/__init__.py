"""pbs_kernels: the Permuted Block-Sparse attention runtime (torch + Triton).

Names load on first use, so reading a profile does not pay for importing torch and Triton.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "pbs_attention": "attention",
    "dense_causal_attention": "attention",
    "PbsStats": "attention",
    "pbs_attention_varlen": "attention",
    "PbsPrefixCache": "attention",
    "PbsGraphs": "graphs",
    "pbs_graphs": "graphs",
    "PbsProfile": "profile",
    "LayerConfig": "profile",
    "ProfileError": "profile",
    "builtin_profile": "profile",
    "PbsSettings": "settings",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pbs_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = sorted(_LAZY)
