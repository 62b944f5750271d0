"""pbs_kernels: the Permuted Block-Sparse attention runtime (torch + Triton)."""
from .attention import PbsStats, dense_causal_attention, pbs_attention

__version__ = "0.1.0"


def __getattr__(name):
    # Profiles load lazily so `import pbs_kernels` stays light for kernel-only users.
    if name in ("PbsProfile", "LayerConfig", "ProfileError"):
        from . import profile

        return getattr(profile, name)
    raise AttributeError(f"module 'pbs_kernels' has no attribute {name!r}")


__all__ = ["LayerConfig", "PbsProfile", "PbsStats", "ProfileError", "dense_causal_attention", "pbs_attention"]
