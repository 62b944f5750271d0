"""Global allocation for `pbs tune`: one setting per layer, whole-model cost within budget.

Each layer offers a few choices (its Pareto front of error against cost, dense included); the
model must reach `target` speedup on total attention time at the least total error. That is a
multiple-choice knapsack. Fronts are small (tens of points) and models have tens of layers, so it
is solved exactly on a cost grid by dynamic programming: costs are rounded *up* to the grid, so a
picked combination never exceeds the budget in real (unrounded) terms.

Pure Python + numpy: no torch, no Optuna, testable on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["Allocation", "Choice", "allocate", "fastest_speedup", "pareto_front"]


@dataclass(frozen=True)
class Choice:
    """One way to run one layer.

    error: the accuracy loss it costs (the quantity summed over layers and minimised).
    cost: its attention time relative to the layer's dense time (dense = 1.0).
    payload: whatever the caller needs back (a config, a trial number); not compared.
    """

    error: float
    cost: float
    payload: Any = field(default=None, compare=False)


@dataclass
class Allocation:
    """The chosen index into each layer's choices, and what the combination costs.

    cost: weighted total time / weighted total dense time (speedup = 1 / cost).
    error: sum of the chosen choices' errors.
    """

    picks: list[int]
    cost: float
    error: float

    @property
    def speedup(self) -> float:
        return 1.0 / self.cost if self.cost > 0 else math.inf


def pareto_front(choices: Sequence[Choice]) -> list[Choice]:
    """The choices no other choice beats on both error and cost, sorted by cost (then error).

    Of exact duplicates the first is kept.
    """
    ordered = sorted(enumerate(choices), key=lambda ic: (ic[1].cost, ic[1].error, ic[0]))
    front: list[Choice] = []
    best_error = math.inf
    for _, c in ordered:
        # Sorted by cost, a choice is on the front iff it beats every cheaper one on error.
        if c.error < best_error:
            front.append(c)
            best_error = c.error
    return front


def _weights(n: int, weights: Sequence[float] | None) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("allocate: weights must be one positive number per layer")
    return w


def fastest_speedup(fronts: Sequence[Sequence[Choice]], weights: Sequence[float] | None = None) -> float:
    """The speedup of the cheapest choice of every layer: the most any allocation can reach."""
    w = _weights(len(fronts), weights)
    cheapest = np.array([min(c.cost for c in f) for f in fronts])
    return float(w.sum() / (w * cheapest).sum())


def allocate(
    fronts: Sequence[Sequence[Choice]],
    target: float,
    weights: Sequence[float] | None = None,
    *,
    resolution: int = 4000,
) -> Allocation | None:
    """Pick one choice per layer with sum(w * cost) <= sum(w) / target at the least total error.

    fronts: per layer, its choices (any order; dominated ones are simply never picked).
    weights: each layer's dense attention time (any unit); None = all layers equal.
    Returns None when even the cheapest choices miss the budget (see `fastest_speedup`).
    Among equal-error allocations the cheapest wins.
    """
    if not fronts or any(len(f) == 0 for f in fronts):
        raise ValueError("allocate: every layer needs at least one choice")
    if not target >= 1.0:
        raise ValueError(f"allocate: target {target} must be >= 1")
    w = _weights(len(fronts), weights)
    budget = float(w.sum()) / target
    cheapest = float(sum(wl * min(c.cost for c in f) for wl, f in zip(w, fronts)))
    if cheapest > budget * (1 + 1e-12):
        return None

    unit = budget / resolution
    R = resolution
    inf = math.inf
    # dp[r]: least total error of the layers so far with rounded cost exactly r grid units.
    dp = np.full(R + 1, inf)
    dp[0] = 0.0
    back: list[np.ndarray] = []  # per layer: the choice that reached each r
    for wl, f in zip(w, fronts):
        new = np.full(R + 1, inf)
        arg = np.full(R + 1, -1, dtype=np.int64)
        for ci, c in enumerate(f):
            units = math.ceil(wl * c.cost / unit - 1e-9)
            if units > R:
                continue
            cand = dp[: R + 1 - units] + c.error
            tgt = new[units:]
            better = cand < tgt
            tgt[better] = cand[better]
            arg[units:][better] = ci
        dp, back = new, back + [arg]

    if not np.isfinite(dp).any():
        # Rounding up pushed a combination that fits in real terms over the grid budget (only
        # possible within 1/resolution of the edge): take every layer's cheapest choice.
        picks = [min(range(len(f)), key=lambda i, f=f: (f[i].cost, f[i].error)) for f in fronts]
    else:
        best = float(dp[np.isfinite(dp)].min())
        # The cheapest r among the least-error ones (errors equal up to float noise).
        r = int(np.flatnonzero(dp <= best + 1e-12 * max(1.0, abs(best)))[0])
        picks = [0] * len(fronts)
        for layer in range(len(fronts) - 1, -1, -1):
            ci = int(back[layer][r])
            picks[layer] = ci
            c = fronts[layer][ci]
            r -= math.ceil(w[layer] * c.cost / unit - 1e-9)
    total_cost = float(sum(wl * f[i].cost for wl, f, i in zip(w, fronts, picks)) / w.sum())
    total_error = float(sum(f[i].error for f, i in zip(fronts, picks)))
    return Allocation(picks=picks, cost=total_cost, error=total_error)
