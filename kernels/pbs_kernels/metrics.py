"""The accuracy metrics of docs/design.md ("Metrics"), one definition for analyze, tune and bench.

Tensor methods only, no torch import: the toolkit can import this where `pbs --help` must stay
instant."""
from __future__ import annotations

import math


def output_error(out, ref) -> float:
    """||out - ref||_F / ||ref||_F in fp32, one head at a time (no fp32 copy of the whole output)."""
    num = den = 0.0
    for h in range(out.shape[1]):
        o, r = out[:, h].float(), ref[:, h].float()
        num += float(((o - r) ** 2).sum())
        den += float((r * r).sum())
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def recall_from_lse(lse_kept, lse_all) -> float:
    """Mean over query rows and heads of the true softmax mass on the computed tiles,
    exp(lse_kept - lse_all), from the log-sum-exps `attend(..., return_lse=True)` returns."""
    return float((lse_kept - lse_all).clamp(max=0.0).exp().mean())
