"""Task-accuracy validation for `pbs tune`: the fastest allocation within an accuracy drop.

Per-layer output error decides the Pareto allocation; whether users can trust the result is
decided by retrieval accuracy (workflows/eval). After the search, the allocation at the target is
checked on held-out retrieval prompts (a haystack and prompts of seeds the calibration never
saw). When PBS loses more than `max_drop` accuracy points against dense attention, the walk
moves down the allocation's Pareto curve: the least-error allocations at lower speedups, each
checked the same way, until one holds the accuracy (dense always does). Tasks where dense itself
answers less than the floor (80%) are left out of the check (blind: they cannot show a loss); when
every task is blind, the walk says so and checks nothing. The first that holds is
the fastest profile found within the drop; if it is slower than the target, the target is out of
reach and the error reports the best (speed, accuracy) pair found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..progress import ProgressFn, no_progress

__all__ = ["AccuracyCheck", "AccuracyWalk", "guard_tasks", "walk_targets", "walk_for_accuracy"]

EVAL_TASKS = ("niah_single", "niah_multikey")  # the tasks small models solve; see docs/eval.md
# English models: the pass key in prose first, then a key-value fact in prose (the same prompt budget).
EVAL_TASKS_ENGLISH = ("passkey", "niah_single")
EVAL_DEPTHS = (0.1, 0.5, 0.9)
HELDOUT_SEED = 1_000  # prompts and haystack of pbs tune's checks: never those of `pbs eval`'s default seed 0
WALK_STEPS = 4  # allocations checked at most (each is one eval of every prompt with PBS)


@dataclass
class AccuracyCheck:
    """One allocation checked on the held-out prompts. speedup: the search's (calibration)
    speedup of the allocation; accuracy / n / ci_*: PBS exact-match accuracy on the prompts of
    the tasks dense can be judged on; dense_only / pbs_only: discordant prompts; p_value: exact
    McNemar test; drop_low / drop_high: 95% paired interval of the drop in points."""

    target: float
    speedup: float
    accuracy: float
    n: int
    ci_low: float
    ci_high: float
    drop_points: float
    passed: bool
    picks: list[int] = field(default_factory=list)
    dense_only: int = 0
    pbs_only: int = 0
    p_value: float = 1.0
    drop_low: float = 0.0
    drop_high: float = 0.0


@dataclass
class AccuracyWalk:
    """status "checked": allocations were checked on `tasks` (those where dense reaches the
    floor); "blind": dense is below the floor on every candidate task, so no check can pass and
    none was run (chosen None). dense_by_task: dense accuracy per candidate task."""

    dense_accuracy: float
    dense_n: int
    dense_ci: tuple[float, float]
    max_drop: float
    tasks: list[str]
    seq_len: int
    samples: int
    checks: list[AccuracyCheck]
    chosen: AccuracyCheck | None  # the first check that passed (None: none did)
    status: str = "checked"
    floor: float = 0.8
    blind_tasks: list[str] = field(default_factory=list)
    dense_by_task: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def walk_targets(target: float, steps: int = WALK_STEPS) -> list[float]:
    """Speedup targets from `target` down towards dense, evenly spaced: 2.0 -> 2, 1.75, 1.5, 1.25."""
    return [1.0 + (target - 1.0) * (steps - i) / steps for i in range(steps)]


def guard_tasks(tokenizer) -> tuple[str, ...]:
    """The candidate tasks of the accuracy check for this tokenizer's grammar."""
    from ..eval import detect_grammar

    return EVAL_TASKS_ENGLISH if detect_grammar(tokenizer) == "english" else EVAL_TASKS


def walk_for_accuracy(model, tokenizer, fronts, target: float, max_drop: float, build_profile: Callable[[list[int]], Any], *,
                      seq_len: int, samples: int, tasks: Sequence[str] | None = None,
                      depths: Sequence[float] = EVAL_DEPTHS, seed: int = HELDOUT_SEED, weights=None,
                      max_positions: int | None = None, floor: float | None = None,
                      progress: ProgressFn = no_progress) -> AccuracyWalk:
    """Check allocations from `target` down (walk_targets) on held-out retrieval prompts until
    one loses at most `max_drop` points (percentage points of exact-match accuracy) against
    dense attention. `build_profile(picks)` turns an allocation's picks into a PbsProfile.

    Only tasks where dense answers at least `floor` of the prompts are checked: where dense
    fails, PBS cannot be seen failing, so such a task never counts as passed. When no task
    reaches the floor the walk is "blind" and checks nothing."""
    from ..eval import Haystack, detect_grammar
    from ..eval.run import DENSE_FLOOR, pair_up, run_eval, wilson_interval
    from .alloc import allocate

    floor = DENSE_FLOOR if floor is None else floor
    candidates = list(tasks) if tasks is not None else list(guard_tasks(tokenizer))
    hay = Haystack.default(tokenizer, detect_grammar(tokenizer), n_tokens=max(40_000, 2 * seq_len), seed=seed)
    kw = dict(seq_lens=[seq_len], depths=list(depths), samples=samples, seed=seed, haystack=hay,
              max_positions=max_positions)
    progress("accuracy check", 0, None)
    dense_run = run_eval(model, tokenizer, tasks=candidates, skip_unfit=True, **kw)
    notes = list(dense_run.notes)
    by_task = {c.task: c.accuracy for c in dense_run.summary if c.method == "dense"}
    seeing = [t for t in candidates if by_task.get(t, 0.0) >= floor]
    blind = [t for t in candidates if t in by_task and t not in seeing]
    dense_rows = [r for r in dense_run.sample_results if r.task in seeing]
    if not seeing:
        d = dense_run.overall["dense"]
        return AccuracyWalk(d.accuracy, d.n, (d.ci_low, d.ci_high), max_drop, candidates, seq_len, samples, [], None,
                            "blind", floor, blind, by_task, notes)
    k, n = sum(r.correct for r in dense_rows), len(dense_rows)
    dense_acc = k / n
    checks: list[AccuracyCheck] = []
    seen: set[tuple[int, ...]] = set()
    chosen = None
    for t in walk_targets(target):
        alloc = allocate(fronts, t, weights)
        if alloc is None or tuple(alloc.picks) in seen:
            continue
        seen.add(tuple(alloc.picks))
        profile = build_profile(alloc.picks)
        r = run_eval(model, tokenizer, profile=profile, dense=False, tasks=seeing, **kw)
        _, _, pair = pair_up(dense_rows + r.sample_results, floor=0.0)
        acc = r.overall["pbs"]
        drop = 100.0 * (dense_acc - acc.accuracy)
        check = AccuracyCheck(t, alloc.speedup, acc.accuracy, acc.n, acc.ci_low, acc.ci_high, drop,
                              drop <= max_drop + 1e-9, list(alloc.picks), pair.dense_only, pair.pbs_only,
                              pair.p_value, 100.0 * pair.drop_low, 100.0 * pair.drop_high)
        checks.append(check)
        progress("accuracy check", len(checks), None)
        if check.passed:
            chosen = check
            break
    lo, hi = wilson_interval(k, n)
    return AccuracyWalk(dense_acc, n, (lo, hi), max_drop, seeing, seq_len, samples, checks, chosen, "checked", floor,
                        blind, by_task, notes)
