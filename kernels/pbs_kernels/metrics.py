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


def oracle_tiles_at_recall(tile_mass, rows, recall: float) -> int:
    """Fewest tiles of one head whose mass reaches the mean recall `recall`: what an oracle that
    knows every tile's true mass keeps to match a selection's recall.

    tile_mass [NQB, NKB]: mean over a query block's rows of the softmax mass on each key block
    (rows sum to 1); rows [NQB]: query rows per block. A tile adds tile_mass * rows / sum(rows)
    to the mean recall, so taking tiles by falling mass, across all query blocks of the head, is
    optimal (every tile costs the same)."""
    gain = (tile_mass * (rows / rows.sum())[:, None]).flatten()
    gain = gain.sort(descending=True).values
    before = gain.cumsum(0) - gain
    # The tolerance absorbs fp32 summation order: the selection's recall is summed row by row.
    return int(((before < recall - 1e-6) & (gain > 0)).sum())


def selection_efficiency(oracle_tiles: float, kept_tiles: float) -> float:
    """Oracle tiles at the selection's recall / tiles the selection computes (summed over heads):
    1.0 = as few tiles as an oracle needs for the same recall; 0.5 = twice as many."""
    return float(oracle_tiles) / float(kept_tiles) if kept_tiles > 0 else 1.0
