"""Task-accuracy validation for `pbs tune`: the fastest allocation within an accuracy drop.

Per-layer output error decides the Pareto allocation; whether users can trust the result is
decided by retrieval accuracy (workflows/eval). After the search, the allocation at the target is
checked on held-out retrieval prompts (a haystack and prompts of seeds the calibration never
saw). When PBS loses more than `max_drop` accuracy points against dense attention, the walk
moves down the allocation's Pareto curve: the least-error allocations at lower speedups, each
checked the same way, until one holds the accuracy (dense always does). The first that holds is
the fastest profile found within the drop; if it is slower than the target, the target is out of
reach and the error reports the best (speed, accuracy) pair found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..progress import ProgressFn, no_progress

__all__ = ["AccuracyCheck", "AccuracyWalk", "walk_targets", "walk_for_accuracy"]

EVAL_TASKS = ("niah_single", "niah_multikey")  # the tasks small models solve; see docs/eval.md
EVAL_DEPTHS = (0.1, 0.5, 0.9)
HELDOUT_SEED = 1_000  # prompts and haystack of pbs tune's checks: never those of `pbs eval`'s default seed 0
WALK_STEPS = 4  # allocations checked at most (each is one eval of every prompt with PBS)


@dataclass
class AccuracyCheck:
    """One allocation checked on the held-out prompts. speedup: the search's (calibration)
    speedup of the allocation; accuracy / n / ci_*: PBS exact-match accuracy on the prompts."""

    target: float
    speedup: float
    accuracy: float
    n: int
    ci_low: float
    ci_high: float
    drop_points: float
    passed: bool
    picks: list[int] = field(default_factory=list)


@dataclass
class AccuracyWalk:
    dense_accuracy: float
    dense_n: int
    dense_ci: tuple[float, float]
    max_drop: float
    tasks: list[str]
    seq_len: int
    samples: int
    checks: list[AccuracyCheck]
    chosen: AccuracyCheck | None  # the first check that passed (None: none did)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def walk_targets(target: float, steps: int = WALK_STEPS) -> list[float]:
    """Speedup targets from `target` down towards dense, evenly spaced: 2.0 -> 2, 1.75, 1.5, 1.25."""
    return [1.0 + (target - 1.0) * (steps - i) / steps for i in range(steps)]


def walk_for_accuracy(model, tokenizer, fronts, target: float, max_drop: float, build_profile: Callable[[list[int]], Any], *,
                      seq_len: int, samples: int, tasks: Sequence[str] = EVAL_TASKS,
                      depths: Sequence[float] = EVAL_DEPTHS, seed: int = HELDOUT_SEED, weights=None,
                      progress: ProgressFn = no_progress) -> AccuracyWalk:
    """Check allocations from `target` down (walk_targets) on held-out retrieval prompts until
    one loses at most `max_drop` points (percentage points of exact-match accuracy) against
    dense attention. `build_profile(picks)` turns an allocation's picks into a PbsProfile."""
    from ..eval import Haystack, run_eval
    from .alloc import allocate

    hay = Haystack.builtin(tokenizer, n_tokens=max(40_000, 2 * seq_len), seed=seed)
    kw = dict(tasks=list(tasks), seq_lens=[seq_len], depths=list(depths), samples=samples, seed=seed, haystack=hay)
    progress("accuracy check", 0, None)
    dense = run_eval(model, tokenizer, **kw).overall["dense"]
    checks: list[AccuracyCheck] = []
    seen: set[tuple[int, ...]] = set()
    chosen = None
    for t in walk_targets(target):
        alloc = allocate(fronts, t, weights)
        if alloc is None or tuple(alloc.picks) in seen:
            continue
        seen.add(tuple(alloc.picks))
        profile = build_profile(alloc.picks)
        r = run_eval(model, tokenizer, profile=profile, dense=False, **kw).overall["pbs"]
        drop = 100.0 * (dense.accuracy - r.accuracy)
        check = AccuracyCheck(t, alloc.speedup, r.accuracy, r.n, r.ci_low, r.ci_high, drop, drop <= max_drop + 1e-9,
                              list(alloc.picks))
        checks.append(check)
        progress("accuracy check", len(checks), None)
        if check.passed:
            chosen = check
            break
    return AccuracyWalk(dense.accuracy, dense.n, (dense.ci_low, dense.ci_high), max_drop, list(tasks), seq_len,
                        samples, checks, chosen)
