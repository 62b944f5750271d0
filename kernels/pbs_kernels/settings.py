"""One value for a layer's PBS settings, carried whole through the runtime.

`pbs_attention(...)`, `pbs_attention_varlen(...)`, `pbs_plan(...)` and the stages keep their
plain keywords and build a `PbsSettings` once; the validator, the plan, varlen, the graph and
crossover keys, the selection op and `analysis.analyze_layer` take it whole. A new per-layer
knob is a field here (with its check), the op that reads it, the profile schema
(`profile.LayerConfig`) and its tests.

Torch-free (it imports only `limits`), so the profile loader and the CLI can build one cheaply.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .limits import BACKENDS, BLOCK_SIZES, ESTIMATORS, THRESHOLD_MASS

__all__ = ["LAYER_FIELDS", "PbsSettings", "check_vertical_keys"]

# The fields a profile sets per layer (`profile.LayerConfig` has them too, plus min_seq_len and
# dense); the others are the call's (the model's window, soft-cap and scale, the backend).
LAYER_FIELDS = ("block_size", "segment_size", "threshold", "permute", "estimator", "threshold_mass",
                "vertical_keys")


def check_vertical_keys(where: str, vertical_keys, block_size: int) -> None:
    """ValueError unless `vertical_keys` is an integer from 0 to block_size (shared by the
    runtime's checks and the analysis)."""
    if isinstance(vertical_keys, bool) or int(vertical_keys) != vertical_keys or not 0 <= vertical_keys <= block_size:
        raise ValueError(f"{where}: vertical_keys {vertical_keys} must be an integer from 0 to block_size "
                         f"{block_size} (the slots lie in a segment's first block)")


@dataclass(frozen=True)
class PbsSettings:
    """PBS settings of one attention call: what `pbs_attention`'s keywords set, minus the
    tensors (sinks, cache) and the call's modes (return_stats, graph, packed).

    block_size, segment_size, threshold, permute, estimator, threshold_mass, vertical_keys,
    min_seq_len: see `pbs_attention`. window / softcap: the model's sliding window and logit
    soft-cap (None: off). scale: the softmax scale (None: 1/sqrt(head dim)). backend: "auto",
    "triton" or "torch" (the ops resolve "auto" per tensor).

    Checked on construction (ValueError, one line, the runtime's messages); threshold, softcap
    and scale are stored as floats. Frozen and hashable: it keys the check, graph and crossover
    caches as it is.
    """

    block_size: int = 128
    segment_size: int = 256
    threshold: float = 0.9
    permute: bool = True
    estimator: str = "mean"
    threshold_mass: str = "earlier"
    vertical_keys: int = 0
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None
    backend: str = "auto"
    min_seq_len: int | str = 0

    def __post_init__(self) -> None:
        self.check()
        object.__setattr__(self, "threshold", float(self.threshold))
        for name in ("softcap", "scale"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        # Hashed once: the value keys per-call caches (a dataclass would hash its 12 fields each time).
        object.__setattr__(self, "_hash", hash(self.values()))

    def __hash__(self) -> int:
        return self._hash

    def check(self, where: str = "pbs_attention") -> PbsSettings:
        """Raise ValueError naming the first bad field and what is allowed; return self."""
        block_size, segment_size, threshold = self.block_size, self.segment_size, self.threshold
        if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
            raise ValueError(f"{where}: block_size {block_size} is not allowed; use one of {BLOCK_SIZES}")
        if segment_size <= 0 or segment_size % block_size:
            raise ValueError(
                f"{where}: segment_size {segment_size} must be a positive multiple of block_size {block_size}"
            )
        if not (0.0 < float(threshold) <= 1.0):
            raise ValueError(f"{where}: threshold {threshold} must be in (0, 1]")
        if self.backend not in BACKENDS:
            raise ValueError(f"{where}: backend {self.backend!r} is not one of {BACKENDS}")
        m = self.min_seq_len
        if m != "auto" and (isinstance(m, (bool, str)) or not m >= 0):
            raise ValueError(f"{where}: min_seq_len {m!r} must be an integer >= 0 or 'auto'")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"{where}: estimator {self.estimator!r} is not one of {ESTIMATORS}")
        if self.threshold_mass not in THRESHOLD_MASS:
            raise ValueError(f"{where}: threshold_mass {self.threshold_mass!r} is not one of {THRESHOLD_MASS}")
        w = self.window
        if w is not None and (isinstance(w, bool) or int(w) != w or w < 1):
            raise ValueError(f"{where}: window {w} must be a positive number of tokens (or None)")
        if self.softcap is not None and not float(self.softcap) > 0:
            raise ValueError(f"{where}: softcap {self.softcap} must be > 0 (or None)")
        check_vertical_keys(where, self.vertical_keys, block_size)
        return self

    def replace(self, **changes) -> PbsSettings:
        """A copy with `changes` (checked again)."""
        return dataclasses.replace(self, **changes)

    def layer_kwargs(self) -> dict:
        """The per-layer fields (`LAYER_FIELDS`) as keywords."""
        return {name: getattr(self, name) for name in LAYER_FIELDS}

    def values(self) -> tuple:
        """Every field's value, in field order (plain ints, floats, bools, strings and None)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def kwargs(self) -> dict:
        """Every field as pbs_attention keywords."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
