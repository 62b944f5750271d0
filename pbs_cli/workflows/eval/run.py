"""Run the retrieval tasks on a model, dense and with a PBS profile, and score them.

    result = run_eval(model, tokenizer, profile="profiles/demo.yaml", seq_lens=[8192],
                      tasks=["niah_single"], depths=[0.1, 0.5, 0.9], samples=4)
    result.results   # [CellResult(task, seq_len, depth, method, accuracy, n, ci_low, ci_high)]

Scoring is exact match of a greedy continuation (our own loop over a KV cache: one prefill, then
single-token decode steps). With a profile, transformers runs PBS for the prefill (queries and
keys at the same positions) and dense attention for the decode steps, which is how a served
model would use it. Prompts run one at a time and unpadded: a padded batch makes the integration
fall back to dense attention, so batching would silently measure dense twice.

The rank of the answer's first token in the prefill's last logits (0 = greedy picks it) is kept
per sample: a softer signal than exact match, and the only one for a model that cannot generate.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .. import distributed
from ..profiles import load_profile
from ..progress import ProgressFn, no_progress
from .errors import LengthBeyondPositions, ProfileMismatchError
from .tasks import (DEPTH_TASKS, Haystack, Sample, check_depths, check_tasks, default_tasks, detect_grammar,
                    make_samples)

__all__ = [
    "DENSE_FLOOR",
    "DEFAULT_DEPTHS",
    "PairedCell",
    "mcnemar_exact",
    "pair_up",
    "paired_cell",
    "paired_difference_interval",
    "METHODS",
    "CellResult",
    "EvalResult",
    "SampleResult",
    "EvalPlan",
    "check_profile_fits",
    "execute_eval",
    "greedy_continue",
    "prepare_eval",
    "run_eval",
    "score",
    "summarize",
    "wilson_interval",
]

METHODS = ("dense", "pbs")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

# ---------------------------------------------------------------------------------------------
# Statistics and scoring.


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for the default z). (0, 1) for
    n = 0. Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or n."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs of a paired comparison: b prompts only
    the first method answers, c only the second. Under "no difference" each discordant prompt is
    a fair coin, so the p-value is the two-sided binomial tail of min(b, c) in b + c tosses
    (1.0 when no prompt is discordant)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired_difference_interval(both: int, only_first: int, only_second: int, neither: int,
                               z: float = 1.959963984540054) -> tuple[float, float]:
    """95% interval for p1 - p2, the difference of two proportions measured on the same items
    (Newcombe 1998, method 10: Wilson intervals of each proportion, combined with the pairs'
    correlation phi). A positive phi is shrunk by n/2 in its numerator, as his continuity-corrected
    method 11 does: uncorrected, 5 prompts both right and 5 both wrong give the empty interval
    [0, 0]. Stays inside [-1, 1]; (-1, 1) for no items."""
    n = both + only_first + only_second + neither
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    l1, u1 = wilson_interval(both + only_first, n, z)
    l2, u2 = wilson_interval(both + only_second, n, z)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    cross = both * neither - only_first * only_second
    if cross > 0:
        cross = max(cross - n / 2.0, 0.0)
    phi = cross / math.sqrt(margins) if margins > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lo), min(1.0, hi)


_WORD = re.compile(r"\w+|;")


def _words(text: str) -> list[str]:
    """Lower-case words and ';' (the record terminator); other punctuation is dropped."""
    return _WORD.findall(text.lower())


def score(sample: Sample, continuation: str) -> bool:
    """Exact match of a generated continuation against the sample's answer (see Sample.match)."""
    got = _words(continuation)
    if sample.match == "prefix":
        want = _words(sample.answers[0])
        return bool(want) and got[: len(want)] == want
    # "all": every answer word present; the answer list is as long as the continuation allows.
    have = set(got)
    return all(set(_words(a)) <= have for a in sample.answers)


# ---------------------------------------------------------------------------------------------
# Generation.


def _cache_keyword(model) -> str:
    # transformers 5.2x renamed forward's `past_key_values` to `cache` (the old name warns);
    # 5.17 on the GPU machine has only the old one.
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def greedy_continue(model, input_ids: Sequence[int], max_new_tokens: int, *, device=None,
                    target_id: int | None = None, stop_ids: Sequence[int] = ()) -> tuple[list[int], int | None]:
    """Greedy decoding with a KV cache: one prefill of `input_ids`, then one token per step.
    Returns (new token ids, rank of `target_id` among the prefill's next-token logits or None)."""
    import torch

    device = device if device is not None else next(model.parameters()).device
    cache_kw = _cache_keyword(model)
    x = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    new: list[int] = []
    rank = None
    with torch.no_grad():
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1].float()
        if target_id is not None:
            rank = int((logits > logits[target_id]).sum())
        past = _cache_of(out)
        for step in range(max_new_tokens):
            tok = int(logits.argmax())
            new.append(tok)
            if tok in stop_ids or step == max_new_tokens - 1:
                break
            out = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, **{cache_kw: past})
            logits = out.logits[0, -1].float()
            past = _cache_of(out)
    return new, rank


# ---------------------------------------------------------------------------------------------
# Results.


@dataclass
class SampleResult:
    task: str
    seq_len: int
    depth: float | None
    index: int
    method: str
    correct: bool
    answer: str
    prediction: str
    first_token_rank: int | None
    seconds: float


@dataclass
class CellResult:
    """Accuracy of one method on one (task, length, depth) cell; depth None for tasks that
    spread their facts, or for a summary over depths. ci_low/ci_high: 95% Wilson interval."""

    task: str
    seq_len: int | None
    depth: float | None
    method: str
    accuracy: float
    n: int
    ci_low: float
    ci_high: float
    correct: int = 0


DENSE_FLOOR = 0.8  # dense accuracy below which a cell cannot show what PBS loses (docs/eval.md)


@dataclass
class PairedCell:
    """Dense and PBS on the same prompts of one (task, length[, depth]) cell; task "all" with
    seq_len None sums the cells that can show a drop. dense_only: prompts dense answers and PBS
    misses; pbs_only: the reverse. drop_low/drop_high: 95% interval of the accuracy drop (dense
    minus PBS, fraction) for paired data; p_value: exact McNemar test on the discordant pairs.
    verdict: "blind" (dense below the floor: a loss cannot show), "drop" (the whole interval above
    zero) or "no evidence of a drop" (the interval reaches zero; it still bounds the drop by
    drop_high)."""

    task: str
    seq_len: int | None
    depth: float | None
    n: int
    both: int
    dense_only: int
    pbs_only: int
    neither: int
    dense_accuracy: float
    pbs_accuracy: float
    drop: float
    drop_low: float
    drop_high: float
    p_value: float
    verdict: str


def paired_cell(task: str, seq_len: int | None, depth: float | None, pairs: Sequence[tuple[bool, bool]],
                floor: float = DENSE_FLOOR) -> PairedCell:
    """PairedCell of (dense correct, PBS correct) pairs."""
    both = sum(1 for d, p in pairs if d and p)
    dense_only = sum(1 for d, p in pairs if d and not p)
    pbs_only = sum(1 for d, p in pairs if p and not d)
    n = len(pairs)
    neither = n - both - dense_only - pbs_only
    lo, hi = paired_difference_interval(both, dense_only, pbs_only, neither)
    dense_acc = (both + dense_only) / n if n else float("nan")
    pbs_acc = (both + pbs_only) / n if n else float("nan")
    if not n or dense_acc < floor:
        verdict = "blind"
    elif lo > 0:
        verdict = "drop"
    else:
        verdict = "no evidence of a drop"
    return PairedCell(task, seq_len, depth, n, both, dense_only, pbs_only, neither, dense_acc, pbs_acc,
                      (dense_only - pbs_only) / n if n else float("nan"), lo, hi, mcnemar_exact(dense_only, pbs_only),
                      verdict)


def pair_up(sample_results: Sequence["SampleResult"], floor: float = DENSE_FLOOR) -> tuple[list[PairedCell], list[PairedCell], PairedCell | None]:
    """(per-depth cells, per task-and-length cells, overall over the cells that are not blind)
    from the per-sample results of a run with both methods; ([], [], None) without PBS."""
    by_prompt: dict[tuple, dict[str, bool]] = {}
    for r in sample_results:
        by_prompt.setdefault((r.task, r.seq_len, r.depth, r.index), {})[r.method] = r.correct
    cells: dict[tuple, list] = {}
    sums: dict[tuple, list] = {}
    for (task, n, depth, _), m in by_prompt.items():
        if "dense" in m and "pbs" in m:
            cells.setdefault((task, n, depth), []).append((m["dense"], m["pbs"]))
            sums.setdefault((task, n), []).append((m["dense"], m["pbs"]))
    if not sums:
        return [], [], None
    per_depth = [paired_cell(t, n, d, p, floor) for (t, n, d), p in cells.items()]
    per_length = [paired_cell(t, n, None, p, floor) for (t, n), p in sums.items()]
    seeing = [pair for c in per_length if c.verdict != "blind" for pair in sums[(c.task, c.seq_len)]]
    overall = paired_cell("all", None, None, seeing, floor) if seeing else None
    return per_depth, per_length, overall


@dataclass
class EvalResult:
    """What run_eval measured. results: every cell; summary: per (task, length, method) over
    depths; overall: per method over everything (the figure tune compares)."""

    model: str
    profile: str | None
    grammar: str
    haystack: str
    tasks: list[str]
    seq_lens: list[int]
    depths: list[float]
    samples: int
    seed: int
    methods: list[str]
    results: list[CellResult]
    summary: list[CellResult]
    overall: dict[str, CellResult]
    seconds: dict[str, float]
    sample_results: list[SampleResult] = field(default_factory=list)
    ranks: int = 1  # tensor-parallel processes (torchrun) the model ran on; seconds are the slowest rank's
    # Paired dense-vs-PBS scoring (pair_up): per depth, per task and length, overall over the
    # cells dense can be judged on (None when every cell is blind or there is no profile).
    paired: list[PairedCell] = field(default_factory=list)
    paired_depths: list[PairedCell] = field(default_factory=list)
    paired_overall: PairedCell | None = None
    floor: float = DENSE_FLOOR
    notes: list[str] = field(default_factory=list)  # e.g. default tasks skipped at a length
    # What the "pbs" method ran at each length (ran_label): "pbs", "pbs on 2 of 4 layers", or
    # "dense" where every layer is below its min_seq_len (or segment) and the profile falls back.
    pbs_ran: dict[int, str] = field(default_factory=dict)

    def accuracy(self, method: str) -> float:
        return self.overall[method].accuracy

    @property
    def drop_points(self) -> float | None:
        """Dense minus PBS accuracy in percentage points (None without a profile)."""
        if "pbs" not in self.overall:
            return None
        return 100.0 * (self.overall["dense"].accuracy - self.overall["pbs"].accuracy)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        def cell(c: CellResult) -> dict[str, Any]:
            d = dataclasses.asdict(c)
            for k in ("accuracy", "ci_low", "ci_high"):
                d[k] = round(d[k], 4)
            return d

        def pair(c: PairedCell) -> dict[str, Any]:
            d = dataclasses.asdict(c)
            for k in ("dense_accuracy", "pbs_accuracy", "drop", "drop_low", "drop_high", "p_value"):
                d[k] = round(d[k], 4)
            return d

        return {
            "model": self.model,
            "profile": self.profile,
            "grammar": self.grammar,
            "haystack": self.haystack,
            "tasks": self.tasks,
            "seq_lens": self.seq_lens,
            "depths": self.depths,
            "samples": self.samples,
            "seed": self.seed,
            "methods": self.methods,
            "results": [cell(c) for c in self.results],
            "summary": [cell(c) for c in self.summary],
            "overall": {m: cell(c) for m, c in self.overall.items()},
            "drop_points": None if self.drop_points is None else round(self.drop_points, 2),
            "seconds": {m: round(s, 2) for m, s in self.seconds.items()},
            "ranks": self.ranks,
            "floor": self.floor,
            "paired": [pair(c) for c in self.paired],
            "paired_depths": [pair(c) for c in self.paired_depths],
            "paired_overall": None if self.paired_overall is None else pair(self.paired_overall),
            "notes": list(self.notes),
            "pbs_ran": {str(n): label for n, label in self.pbs_ran.items()},
            "sample_results": [dataclasses.asdict(s) for s in self.sample_results],
        }


def _cell(task, seq_len, depth, method, hits: list[bool]) -> CellResult:
    k, n = sum(hits), len(hits)
    lo, hi = wilson_interval(k, n)
    return CellResult(task, seq_len, depth, method, k / n if n else float("nan"), n, lo, hi, k)


def summarize(sample_results: Sequence[SampleResult]) -> tuple[list[CellResult], list[CellResult], dict[str, CellResult]]:
    """(cells, per task/length summaries, per method overall) from per-sample results."""
    cells: dict[tuple, list[bool]] = {}
    sums: dict[tuple, list[bool]] = {}
    overall: dict[str, list[bool]] = {}
    for r in sample_results:
        cells.setdefault((r.task, r.seq_len, r.depth, r.method), []).append(r.correct)
        sums.setdefault((r.task, r.seq_len, r.method), []).append(r.correct)
        overall.setdefault(r.method, []).append(r.correct)
    return (
        [_cell(t, n, d, m, h) for (t, n, d, m), h in cells.items()],
        [_cell(t, n, None, m, h) for (t, n, m), h in sums.items()],
        {m: _cell("all", None, None, m, h) for m, h in overall.items()},
    )


# ---------------------------------------------------------------------------------------------
# Checks that run before any work.


def check_profile_fits(model, profile, model_name: str | None = None) -> None:
    """ProfileMismatchError when `profile` sets layers `model` lacks or names another model."""
    from pbs_kernels.integrations.hf import attention_layers

    layers = attention_layers(model)
    n_layers = max((m.layer_idx for m in layers), default=-1) + 1
    extra = sorted(i for i in profile.layers if i >= n_layers)
    if extra:
        raise ProfileMismatchError(profile.model, model_name or type(model).__name__, layer=extra[0],
                                   num_layers=n_layers)
    if profile.model and model_name and _short_name(profile.model) != _short_name(model_name):
        raise ProfileMismatchError(profile.model, model_name)


def _short_name(name: str) -> str:
    # A hub id and the folder it was saved to compare equal by their last component.
    return Path(str(name).rstrip("/")).name.lower()


def _check_length(samples: Sequence[Sample], max_positions: int | None, model: str) -> None:
    if max_positions is None:
        return
    # Prompts at the limit were shortened to fit their answer (make_sample); longer ones cannot be.
    worst = max(samples, key=lambda s: s.seq_len)
    if worst.seq_len > max_positions:
        raise LengthBeyondPositions(worst.seq_len, worst.max_new_tokens, max_positions, model)


# ---------------------------------------------------------------------------------------------


@dataclass
class EvalPlan:
    """Checked inputs of an eval: every prompt generated, the profile loaded and fitted to the
    model. `prepare_eval` builds it (all checks, no forward pass); `execute_eval` runs it."""

    model: Any
    tokenizer: Any
    profile: Any
    profile_name: str | None
    model_name: str | None
    methods: list[str]
    tasks: list[str]
    seq_lens: list[int]
    depths: list[float]
    samples: int
    seed: int
    haystack: Haystack
    prompts: list[Sample]
    backend: str = "auto"
    # Lengths at which some layer the profile makes sparse still runs dense (prompt not longer
    # than its min_seq_len or its segment): PBS is not measured there for those layers.
    dense_lengths: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # default tasks skipped, prompts shortened to fit
    pbs_ran: dict[int, str] = field(default_factory=dict)  # EvalResult.pbs_ran


def ran_label(cfgs, n: int) -> str:
    """What a profile (its layers' configs `cfgs`) runs on an `n`-token prompt: "pbs", "pbs on
    k of L layers", or "dense" (pbs_attention falls back below min_seq_len and at one segment).
    A layer with min_seq_len "auto" counts as sparse: it runs PBS where PBS measured faster."""
    sparse = sum(1 for c in cfgs if not c.dense and not c.short_for(n))
    auto = any(not c.dense and c.min_seq_len == "auto" for c in cfgs)
    if sparse == 0:
        return "dense"
    label = "pbs" if sparse == len(cfgs) else f"pbs on {sparse} of {len(cfgs)} layers"
    return label + " (auto)" if auto else label


def prepare_eval(model, tokenizer, *, profile=None, seq_lens: Sequence[int] = (8192,),
                 tasks: Sequence[str] | None = None, depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 4,
                 seed: int = 0, haystack: Haystack | None = None, model_name: str | None = None,
                 max_positions: int | None = None, backend: str = "auto", dense: bool = True,
                 skip_unfit: bool | None = None) -> EvalPlan:
    """Check everything that can be checked before the first forward pass (task names, depths,
    lengths against `max_positions`, the profile against the model) and generate the prompts.

    tasks None: the default list for the model's grammar (default_tasks); a default task that
    cannot be posed at a length is skipped with a note (EvalPlan.notes), while a task the caller
    named raises (skip_unfit=True skips those too). Prompts at `max_positions` are shortened to leave room for their answer."""
    from pbs_kernels.profile import PbsProfile

    named = tasks is not None
    skip = (not named) if skip_unfit is None else skip_unfit
    grammar = detect_grammar(tokenizer)
    tasks = check_tasks(tasks if named else default_tasks(grammar))
    depths = check_depths(depths)
    if samples < 1:
        raise ValueError(f"run_eval: samples must be >= 1, got {samples}")
    profile_name = None
    if profile is not None and not isinstance(profile, PbsProfile):
        # A path from a Python caller; `pbs eval` passes the PbsProfile it loaded.
        profile_name = str(profile)
        profile = load_profile(profile)
    elif profile is not None:
        profile_name = profile.model and f"<profile for {profile.model}>"
    if profile is not None:
        check_profile_fits(model, profile, model_name)
    methods = (["dense"] if dense else []) + (["pbs"] if profile is not None else [])
    if not methods:
        raise ValueError("run_eval: nothing to run (dense=False and no profile)")
    hay = haystack or Haystack.default(tokenizer, grammar, n_tokens=max(40_000, 2 * max(seq_lens)), seed=seed)
    fits = max_positions is None or max(seq_lens) <= max_positions
    skipped: list[tuple[str, int, Exception]] | None = [] if skip else None
    prompts = make_samples(tasks, tokenizer, hay, seq_lens=seq_lens, depths=depths, samples=samples, seed=seed,
                           max_positions=max_positions if fits else None, skipped=skipped)
    _check_length(prompts, max_positions, model_name or type(model).__name__)
    notes = [f"task {t} skipped at {n} tokens: {why}" for t, n, why in skipped or []]
    if not prompts:
        # Every default task was skipped: the first reason is the error.
        raise skipped[0][2]
    cut = sorted({len(s.input_ids) for s in prompts if len(s.input_ids) < s.seq_len})
    if cut:
        span = str(cut[0]) if len(cut) == 1 else f"{cut[0]}-{cut[-1]}"
        notes.append(f"prompts of {max(seq_lens)} tokens reach the model's {max_positions} positions: "
                     f"shortened to {span} tokens to leave room for the answer")
    dense_lengths = []
    if profile is not None:
        from pbs_kernels.integrations.hf import attention_layers

        cfgs = [profile.layer(m.layer_idx) for m in attention_layers(model)]
        # The prompts' own lengths: at the model's limit they are a few tokens shorter than asked.
        shortest = {n: min(len(p.input_ids) for p in prompts if p.seq_len == n) for n in {p.seq_len for p in prompts}}
        dense_lengths = [n for n in seq_lens if n in shortest
                         and any(not c.dense and c.short_for(shortest[n]) for c in cfgs)]
        pbs_ran = {n: ran_label(cfgs, shortest.get(n, n)) for n in seq_lens}
    tasks = [t for t in tasks if any(p.task == t for p in prompts)]
    return EvalPlan(model, tokenizer, profile, profile_name, model_name, methods, tasks, list(seq_lens), depths,
                    samples, seed, hay, prompts, backend, dense_lengths, notes, pbs_ran if profile is not None else {})


def execute_eval(plan: EvalPlan, *, progress: ProgressFn = no_progress, floor: float = DENSE_FLOOR) -> EvalResult:
    """Run every prompt of `plan` with each method, one prompt at a time, and score them (paired
    where both methods ran; `floor`: the dense accuracy below which a cell is blind)."""
    from pbs_kernels.integrations.hf import pbs_profile

    model, tokenizer, profile, methods = plan.model, plan.tokenizer, plan.profile, plan.methods
    device = next(model.parameters()).device
    stop_ids = [i for i in (getattr(tokenizer, "eos_token_id", None),) if i is not None]
    total = len(plan.prompts) * len(methods)
    done = 0
    results: list[SampleResult] = []
    progress("eval", 0, total)
    was_training = model.training
    model.eval()
    try:
        for s in plan.prompts:
            first = tokenizer(" " + s.answers[0], add_special_tokens=False)["input_ids"]
            target = first[0] if first else None
            for method in methods:
                t0 = time.perf_counter()
                if method == "pbs":
                    with pbs_profile(model, profile, backend=plan.backend):
                        new, rank = greedy_continue(model, s.input_ids, s.max_new_tokens, device=device,
                                                    target_id=target, stop_ids=stop_ids)
                else:
                    new, rank = greedy_continue(model, s.input_ids, s.max_new_tokens, device=device,
                                                target_id=target, stop_ids=stop_ids)
                dt = time.perf_counter() - t0
                text = tokenizer.decode(new, skip_special_tokens=True)
                results.append(SampleResult(s.task, s.seq_len, s.depth, s.index, method, score(s, text),
                                            s.answer, text.strip(), rank, dt))
                done += 1
                progress("eval", done, total)
    finally:
        model.train(was_training)

    # Tensor-parallel (torchrun): every rank ran the same prompts in step; a prompt took as long
    # as its slowest rank (one all-reduce here; outside torchrun the times stay as measured).
    slow = distributed.slowest([r.seconds for r in results], device)
    seconds = dict.fromkeys(methods, 0.0)
    for r, dt in zip(results, slow):
        r.seconds = round(dt, 3)
        seconds[r.method] += dt
    cells, summary, overall = summarize(results)
    paired_depths, paired, paired_overall = pair_up(results, floor)
    return EvalResult(
        model=plan.model_name or type(model).__name__,
        profile=plan.profile_name,
        grammar=detect_grammar(tokenizer),
        haystack=plan.haystack.source,
        tasks=plan.tasks,
        seq_lens=plan.seq_lens,
        depths=plan.depths,
        samples=plan.samples,
        seed=plan.seed,
        methods=methods,
        results=cells,
        summary=summary,
        overall=overall,
        seconds=seconds,
        sample_results=results,
        ranks=distributed.ranks().world,
        paired=paired,
        paired_depths=paired_depths,
        paired_overall=paired_overall,
        floor=floor,
        notes=list(plan.notes),
        pbs_ran=dict(plan.pbs_ran),
    )


def run_eval(model, tokenizer, *, profile=None, seq_lens: Sequence[int] = (8192,),
             tasks: Sequence[str] | None = None, depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 4,
             seed: int = 0, haystack: Haystack | None = None, model_name: str | None = None,
             max_positions: int | None = None, backend: str = "auto", dense: bool = True,
             progress: ProgressFn = no_progress, floor: float = DENSE_FLOOR,
             skip_unfit: bool | None = None) -> EvalResult:
    """Score `model` on the tasks, dense and (with `profile`, a PbsProfile or a path) with PBS:
    prepare_eval (every check, before any forward pass) then execute_eval.

    `dense=False` skips the dense runs (for a caller that already has them). Prompts are
    generated from `seed` and the haystack (built-in filler by default; pass another seed's
    Haystack for held-out prompts).
    """
    plan = prepare_eval(model, tokenizer, profile=profile, seq_lens=seq_lens, tasks=tasks, depths=depths,
                        samples=samples, seed=seed, haystack=haystack, model_name=model_name,
                        max_positions=max_positions, backend=backend, dense=dense, skip_unfit=skip_unfit)
    return execute_eval(plan, progress=progress, floor=floor)
