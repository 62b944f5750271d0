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
from ..progress import ProgressFn, no_progress
from .errors import LengthBeyondPositions, ProfileMismatchError
from .tasks import DEPTH_TASKS, TASKS, Haystack, Sample, check_depths, check_tasks, detect_grammar, make_samples

__all__ = [
    "DEFAULT_DEPTHS",
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
    worst = max(samples, key=lambda s: s.seq_len + s.max_new_tokens)
    if worst.seq_len + worst.max_new_tokens > max_positions:
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
    pbs_ran: dict[int, str] = field(default_factory=dict)  # EvalResult.pbs_ran


def ran_label(cfgs, n: int) -> str:
    """What a profile (its layers' configs `cfgs`) runs on an `n`-token prompt: "pbs", "pbs on
    k of L layers", or "dense" (pbs_attention falls back below min_seq_len and at one segment)."""
    sparse = sum(1 for c in cfgs if not c.dense and n >= c.min_seq_len and n > c.segment_size)
    if sparse == 0:
        return "dense"
    return "pbs" if sparse == len(cfgs) else f"pbs on {sparse} of {len(cfgs)} layers"


def prepare_eval(model, tokenizer, *, profile=None, seq_lens: Sequence[int] = (8192,),
                 tasks: Sequence[str] = TASKS, depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 4,
                 seed: int = 0, haystack: Haystack | None = None, model_name: str | None = None,
                 max_positions: int | None = None, backend: str = "auto", dense: bool = True) -> EvalPlan:
    """Check everything that can be checked before the first forward pass (task names, depths,
    lengths against `max_positions`, the profile against the model) and generate the prompts."""
    from pbs_kernels.profile import PbsProfile

    tasks = check_tasks(tasks)
    depths = check_depths(depths)
    if samples < 1:
        raise ValueError(f"run_eval: samples must be >= 1, got {samples}")
    profile_name = None
    if profile is not None and not isinstance(profile, PbsProfile):
        profile_name = str(profile)
        profile = PbsProfile.load(profile)
    elif profile is not None:
        profile_name = profile.model and f"<profile for {profile.model}>"
    if profile is not None:
        check_profile_fits(model, profile, model_name)
    methods = (["dense"] if dense else []) + (["pbs"] if profile is not None else [])
    if not methods:
        raise ValueError("run_eval: nothing to run (dense=False and no profile)")
    hay = haystack or Haystack.builtin(tokenizer, n_tokens=max(40_000, 2 * max(seq_lens)), seed=seed)
    prompts = make_samples(tasks, tokenizer, hay, seq_lens=seq_lens, depths=depths, samples=samples, seed=seed)
    _check_length(prompts, max_positions, model_name or type(model).__name__)
    dense_lengths = []
    if profile is not None:
        from pbs_kernels.integrations.hf import attention_layers

        cfgs = [profile.layer(m.layer_idx) for m in attention_layers(model)]
        dense_lengths = [n for n in seq_lens
                         if any(not c.dense and (n < c.min_seq_len or n <= c.segment_size) for c in cfgs)]
        pbs_ran = {n: ran_label(cfgs, n) for n in seq_lens}
    return EvalPlan(model, tokenizer, profile, profile_name, model_name, methods, tasks, list(seq_lens), depths,
                    samples, seed, hay, prompts, backend, dense_lengths, pbs_ran if profile is not None else {})


def execute_eval(plan: EvalPlan, *, progress: ProgressFn = no_progress) -> EvalResult:
    """Run every prompt of `plan` with each method, one prompt at a time, and score them."""
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
        pbs_ran=dict(plan.pbs_ran),
    )


def run_eval(model, tokenizer, *, profile=None, seq_lens: Sequence[int] = (8192,),
             tasks: Sequence[str] = TASKS, depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 4,
             seed: int = 0, haystack: Haystack | None = None, model_name: str | None = None,
             max_positions: int | None = None, backend: str = "auto", dense: bool = True,
             progress: ProgressFn = no_progress) -> EvalResult:
    """Score `model` on the tasks, dense and (with `profile`, a PbsProfile or a path) with PBS:
    prepare_eval (every check, before any forward pass) then execute_eval.

    `dense=False` skips the dense runs (for a caller that already has them). Prompts are
    generated from `seed` and the haystack (built-in filler by default; pass another seed's
    Haystack for held-out prompts).
    """
    plan = prepare_eval(model, tokenizer, profile=profile, seq_lens=seq_lens, tasks=tasks, depths=depths,
                        samples=samples, seed=seed, haystack=haystack, model_name=model_name,
                        max_positions=max_positions, backend=backend, dense=dense)
    return execute_eval(plan, progress=progress)
