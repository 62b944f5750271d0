"""The workflow behind `pbs tune`: calibrate, search per layer, allocate, validate.

    result = run_tune(model, calib_ids, heldout_ids, TuneSettings(target_speedup=2.0, out=path),
                      progress=report_fn)
    save_file(path, result.profile.dumps())   # the command writes it (workflows.outputs)

1. Calibration: one dense prefill of `calib_ids` captures every layer's post-RoPE Q, K, V
   (pbs_kernels.integrations.hf.capture_attention).
2. Per layer: an Optuna study (study.py) over block size, segment, threshold and permutation,
   two objectives, output error and cost (measured on CUDA, predicted elsewhere; cost.py),
   seeded from `pbs_kernels.analysis.analyze_layer` on the same activations. Dense attention is
   always one of the layer's options (error 0, cost 1).
3. Allocation (alloc.py): from each layer's Pareto front, the setting per layer with total
   attention time <= dense / target at the least summed output error.
4. Validation on held-out text: each layer's chosen setting on the held-out activations (error,
   recall, density, cost), and the whole model with the profile applied: logits KL(dense || pbs)
   and perplexity against the dense model.

Nothing prints: progress goes through a callback, the result is a plain dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..capture import CapturedLayer, capture_prefill
from ..errors import (AccuracyUnreachableError, TargetAboveBound, TargetUnreachableError, TrialsTooFew,
                      UsageError)
from ..lengths import format_length
from ..progress import ProgressFn, no_progress

__all__ = ["TargetUnreachableError", "TuneResult", "TuneSettings", "run_tune"]

OBJECTIVE = "min_error"  # least summed per-layer output error at the target speedup
# Keep captured activations on the GPU while they take less than this share of its free memory;
# beyond it they wait in host memory and travel to the GPU one layer at a time.
GPU_CAPTURE_SHARE = 0.3
LOGITS_CHUNK_BYTES = 1 << 30


@dataclass
class TuneSettings:
    """What `run_tune` searches for. trials: completed trials per layer study (seeds included).
    storage: an Optuna storage URL / journal path (None: SQLite beside `out`). study: the base
    study name (None: derived from the model, length and calibration, so reruns resume)."""

    target_speedup: float
    out: Path
    trials: int = 30
    storage: str | None = None
    study: str | None = None
    seed: int = 0
    model_name: str = ""
    analyze: bool = True  # seed each study from analyze_layer figures
    cost_model: str | None = None  # "measured" | "predicted"; None: measured on CUDA, else predicted
    # Task-accuracy check (tune/accuracy.py): the most accuracy points PBS may lose against dense
    # attention on held-out retrieval prompts; None skips the check. eval_samples: prompts per
    # task and depth (None: 2 on the CPU, 6 on CUDA).
    max_accuracy_drop: float | None = 1.0
    eval_samples: int | None = None


@dataclass
class LayerResult:
    """One layer: its study, its Pareto front (dense first), the chosen point, held-out figures.
    Points are dicts: config (LayerConfig fields), error, recall, density, cost, predicted_cost,
    time_ms, trial (None for dense)."""

    layer: int
    study: str | None
    trials_before: int = 0
    trials_run: int = 0
    trials_complete: int = 0
    unsupported: str | None = None
    # why the layer got its setting when the choice is not PBS's trade-off (a window layer kept
    # exact inside its window); goes into the profile's `reason:` and the report
    reason: str | None = None
    window: int | None = None
    window_reason: str | None = None  # the reason, should the allocation choose the windowed option
    analysis: dict[str, Any] | None = None
    front: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] | None = None
    heldout: dict[str, Any] | None = None


@dataclass
class TuneResult:
    model: str
    seq_len: int
    target_speedup: float
    objective: str
    cost_model: str  # "predicted" | "measured"
    device: str
    dtype: str
    storage: str
    study: str
    trials: int
    layers: list[LayerResult]
    search: dict[str, Any]  # the allocation on calibration figures: speedup, cost, error_sum, best_speedup
    validation: dict[str, Any]
    metrics: dict[str, Any]
    out: str
    elapsed_s: float
    notes: list[str] = field(default_factory=list)
    profile: Any = field(default=None, repr=False)
    accuracy: dict[str, Any] | None = None  # the task-accuracy walk (tune/accuracy.py), None when skipped

    def to_dict(self) -> dict[str, Any]:
        from ..jsonable import to_jsonable

        d = {f.name: to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "profile"}
        d["profile"] = self.profile.to_dict() if self.profile is not None else None
        return d


# ---------------------------------------------------------------------------------------------
# Calibration capture.


def capture_layers(model, input_ids, *, name: str = "") -> dict[int, Any]:
    """One dense prefill (workflows.capture); every attention layer's post-RoPE Q/K/V as a
    LayerCapture.

    On CUDA the activations stay on the GPU while they fit in GPU_CAPTURE_SHARE of free memory,
    else they move to host memory as they are captured.
    """
    import torch

    from .layer import LayerCapture

    caps: dict[int, LayerCapture] = {}
    budget = None
    if input_ids.is_cuda:
        free, _ = torch.cuda.mem_get_info(input_ids.device)
        budget = GPU_CAPTURE_SHARE * free
    used = 0

    def on_layer(layer: CapturedLayer) -> None:
        nonlocal used
        # The attention inputs are fresh tensors of this forward (no KV cache): keeping references
        # is enough, no copy unless they must move.
        t = [x.contiguous() for x in (layer.q, layer.k, layer.v)]
        size = sum(x.numel() * x.element_size() for x in t)
        if budget is not None and used + size > budget:
            t = [x.to("cpu") for x in t]  # the GPU needs the room for the search itself
        elif budget is not None:
            used += size
        caps[layer.layer] = LayerCapture.of(layer, *t)

    capture_prefill(model, input_ids, on_layer, name=name)
    return caps


# ---------------------------------------------------------------------------------------------
# Logits of a whole prefill, without holding [N, vocab] for big vocabularies.


def _final_hidden_and_head(model, input_ids):
    """(hidden [N, d], head fn hidden -> logits) or (logits [N, V], None) for small outputs."""
    import torch

    N = int(input_ids.shape[1])
    vocab = int(getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                        "vocab_size", 0) or 0)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if vocab * N * 4 <= LOGITS_CHUNK_BYTES or decoder is None or head is None:
        logits = model(input_ids=input_ids, use_cache=False).logits[0]
        return logits, None
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[0]
    cap = getattr(model.config, "final_logit_softcapping", None)

    def to_logits(h):
        z = head(h)
        return torch.tanh(z / cap) * cap if cap else z

    return hidden, to_logits


def _logit_stats(dense, pbs, targets) -> dict[str, float]:
    """Mean KL(dense || pbs) per position, NLL of both (next-token), in nats."""
    (hd, fd), (hp, fp) = dense, pbs
    N = targets.shape[0] + 1
    rows = max(1, LOGITS_CHUNK_BYTES // (4 * 4 * max(1, (fd(hd[:1]) if fd else hd[:1]).shape[-1])))
    kl = nll_d = nll_p = 0.0
    for r0 in range(0, N - 1, rows):
        r1 = min(N - 1, r0 + rows)
        ld = (fd(hd[r0:r1]) if fd else hd[r0:r1]).float().log_softmax(-1)
        lp = (fp(hp[r0:r1]) if fp else hp[r0:r1]).float().log_softmax(-1)
        kl += float((ld.exp() * (ld - lp)).sum())
        t = targets[r0:r1, None]
        nll_d -= float(ld.gather(1, t).sum())
        nll_p -= float(lp.gather(1, t).sum())
    n = N - 1
    # KL is >= 0; rounding makes identical distributions come out at -1e-10.
    return {"kl": max(kl / n, 0.0), "nll_dense": nll_d / n, "nll_pbs": nll_p / n}


# ---------------------------------------------------------------------------------------------
# Helpers.


def _config_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _dense_point(space) -> dict[str, Any]:
    from pbs_kernels.profile import LayerConfig

    cfg = LayerConfig(dense=True, min_seq_len=space.min_seq_len)
    return {"trial": None, "config": _config_dict(cfg), "error": 0.0, "recall": 1.0, "density": 1.0,
            "cost": 1.0, "predicted_cost": 1.0, "time_ms": None}


def slug(name: str) -> str:
    """A file-name-safe short form of a model id or folder ('meta-llama/Llama-3.1-8B' -> 'llama-3.1-8b')."""
    import re

    base = Path(name.rstrip("/")).name or name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower() or "model"


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _build_profile(layers: list[LayerResult], settings: TuneSettings, seq_len: int, min_seq_len: int):
    """Defaults = the commonest chosen PBS setting (fewest overrides); each layer its choice."""
    from pbs_kernels.profile import LayerConfig, PbsProfile

    chosen = {lr.layer: LayerConfig(**lr.chosen["config"]) for lr in layers}
    sparse = [c for c in chosen.values() if not c.dense]
    if sparse:
        defaults = Counter(sparse).most_common(1)[0][0]
    else:
        defaults = LayerConfig(min_seq_len=min_seq_len)
    profile = PbsProfile(
        model=settings.model_name or None,
        tuned_for={"seq_len": seq_len, "target_speedup": float(settings.target_speedup), "objective": OBJECTIVE},
        defaults=defaults,
    )
    for idx, cfg in sorted(chosen.items()):
        if cfg.dense:
            profile.layers[idx] = {"dense": True}  # the other fields do not matter for a dense layer
        else:
            profile.set_layer(idx, cfg)
    for lr in layers:
        lr.reason = lr.window_reason if lr.chosen is not None and lr.chosen.get("windowed") else None
        if lr.reason:
            profile.layers.setdefault(lr.layer, {})["reason"] = lr.reason
    return profile


def _windowed_option(space, cap, n_tokens: int) -> tuple[dict[str, Any], float]:
    """A sliding-window layer's exact option and PBS's cost floor, both predicted.

    Exact attention inside the window is a PBS setting: threshold 1.0 without permutation keeps
    every tile that meets the window and no other (the selection never keeps a tile wholly
    outside it), so its error is 0 and its work the window's share of the causal tiles. PBS can
    keep fewer of those tiles, but pays for scoring keys and sorting; at density 0 it would still
    cost `floor`. When the window's cost is at or below that floor no PBS setting can beat it."""
    from pbs_kernels.blocks import window_density
    from pbs_kernels.profile import LayerConfig

    from .cost import predicted_cost

    b = max(space.block_sizes)
    cfg = LayerConfig(block_size=b, segment_size=b, threshold=1.0, permute=False, min_seq_len=space.min_seq_len)
    share = window_density(n_tokens, b, cap.window)
    cost = predicted_cost(block_size=b, permute=False, density=share, n_tokens=n_tokens)
    floor = min(predicted_cost(block_size=bs, permute=True, density=0.0, n_tokens=n_tokens) for bs in space.block_sizes)
    point = {"trial": None, "config": _config_dict(cfg), "error": 0.0, "recall": 1.0, "density": share,
             "cost": cost, "predicted_cost": cost, "time_ms": None, "windowed": True}
    return point, floor


# ---------------------------------------------------------------------------------------------
# The workflow.


def speedup_bound(space) -> float:
    """The most attention speedup any setting of `space` could give: the cost model at density 0
    (no tile computed), where only the fixed share for selection and permutation is left."""
    from .cost import predicted_cost

    return 1.0 / min(predicted_cost(block_size=b, permute=p, density=0.0, n_tokens=space.n_tokens)
                     for b in space.block_sizes for p in (False, True))


def check_tune(settings: TuneSettings, n_tokens: int) -> None:
    """Everything about a tune that can be known before its work: trials, the length, the profile
    path and the storage's file. `run_tune` calls it; a caller that prints a banner first calls
    it before that."""
    from ..outputs import check_out_file
    from . import study as ts

    if settings.trials < 1:
        raise TrialsTooFew(settings.trials)
    space = ts.SearchSpace.for_length(n_tokens)
    bound = speedup_bound(space)
    if settings.target_speedup > bound:
        raise TargetAboveBound(settings.target_speedup, bound, "predicted", n_tokens)
    check_out_file(settings.out)
    ts.check_storage(settings.storage, settings.out)


def run_tune(model, calib_ids, heldout_ids, settings: TuneSettings, *, tokenizer=None,
             progress: ProgressFn = no_progress) -> TuneResult:
    """Tune a PBS profile for `model` (see the module docstring).

    calib_ids, heldout_ids: [1, N] token ids on the model's device (same N: the tuned length).
    tokenizer: the model's, for the task-accuracy check (settings.max_accuracy_drop); without
    one the check is skipped (a note says so).
    Raises TargetUnreachableError when no allocation reaches the target, AccuracyUnreachableError
    when none at the target keeps task accuracy within the drop (nothing is saved then; the
    studies stay in the storage, so a rerun with a lower target costs no new trials).
    """
    import optuna
    import torch

    from pbs_kernels.analysis import analyze_layer
    from pbs_kernels.profile import LayerConfig
    from pbs_kernels.settings import PbsSettings

    from . import study as ts
    from .alloc import Choice, allocate, fastest_speedup, pareto_front
    from .layer import LayerEvaluator

    t0 = time.perf_counter()
    if calib_ids.dim() != 2 or calib_ids.shape[0] != 1 or heldout_ids.shape != calib_ids.shape:
        raise ValueError("run_tune: calib_ids and heldout_ids must both be [1, N]")
    N = int(calib_ids.shape[1])
    check_tune(settings, N)
    device = calib_ids.device
    cost_model = settings.cost_model or ("measured" if device.type == "cuda" else "predicted")
    if cost_model not in ("measured", "predicted"):
        raise ValueError(f"run_tune: cost_model {cost_model!r} is not 'measured' or 'predicted'")
    if cost_model == "measured" and device.type != "cuda":
        raise UsageError("measured costs (kernel timings) need a CUDA GPU; run on one, or use the predicted cost model")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    name = settings.model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    device_name = _device_name(device)
    min_seq_len = min(LayerConfig().min_seq_len, N)  # never sparse below the tuned length or 16K
    limit = _max_positions(model)
    if limit is not None and N + ANSWER_ROOM > limit:
        # Tuned at the model's limit: prompts there leave room for their answer (eval shortens
        # them by its few tokens), and the profile must still run PBS on them, not dense.
        min_seq_len = min(min_seq_len, limit - ANSWER_ROOM)
    space = ts.SearchSpace.for_length(N, min_seq_len=min_seq_len)
    notes: list[str] = []

    # The storage first: one that cannot be opened fails before the prefill, not after it.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, storage_label = ts.open_storage(settings.storage, settings.out)

    # 1. Calibration.
    progress("calibration prefill", 0, 1)
    caps = capture_layers(model, calib_ids, name=name)
    progress("calibration prefill", 1, 1)
    layer_ids = sorted(caps)

    # 2. Studies.
    shape = list(caps[layer_ids[0]].q.shape[1:2]) + list(caps[layer_ids[0]].k.shape[1:2]) + [caps[layer_ids[0]].q.shape[3]]
    identity = {
        **space.identity(),
        "model": name,
        "calibration": ts.fingerprint(calib_ids[0].tolist()),
        "cost_model": cost_model,
        # Measured costs time pbs_attention as apply_profile runs it (graph="auto", cost.pbs_time_ms);
        # studies from before that (eager timings) are not resumed.
        **({"timing": "graph-auto"} if cost_model == "measured" else {}),
        "device": device_name if cost_model == "measured" else "any",
        "dtype": dtype,
        "shape": shape,
    }
    model_slug = slug(name)
    if not model_slug.startswith("pbs-"):  # the demo model is 'pbs-demo': no 'pbs-pbs-demo-...'
        model_slug = f"pbs-{model_slug}"
    base = settings.study or f"{model_slug}-{format_length(N)}-{ts.fingerprint(identity)[:8]}"
    results: list[LayerResult] = []
    dense_ms: dict[tuple, tuple[float, str]] = {}
    total = settings.trials * sum(1 for i in layer_ids if caps[i].unsupported is None)
    done_layers = 0
    progress("trials", 0, total)

    for idx in layer_ids:
        cap = caps[idx]
        lr = LayerResult(layer=idx, study=None, unsupported=cap.unsupported, window=cap.window)
        results.append(lr)
        lr.front = [_dense_point(space)]
        if cap.unsupported is not None:
            continue
        if cap.window is not None:
            point, floor = _windowed_option(space, cap, N)
            if cost_model == "measured":
                work = cap.to(device) if cap.q.device != device else cap
                m = LayerEvaluator(work, cost_model="measured").evaluate(LayerConfig(**point["config"]))
                point.update(cost=m.cost, time_ms=m.time_ms)
            lr.front.append(point)
            if point["predicted_cost"] <= floor:
                lr.window_reason = (f"window {cap.window}: exact attention over its tiles ({point['density']:.0%} "
                                    f"of the causal tiles, cost {point['predicted_cost']:.2f}) is no dearer than "
                                    f"PBS's fixed cost ({floor:.2f})")
                done_layers += settings.trials
                progress("trials", done_layers, total)
                continue
            lr.window_reason = (f"window {cap.window}: exact attention over its tiles ({point['density']:.0%} of "
                                f"the causal tiles) is cheaper than PBS at this error")
        lr.study = f"{base}-layer{idx}"
        study = ts.open_study(storage, lr.study, {**identity, "layer": idx}, seed=settings.seed * 7919 + idx,
                              n_startup=max(5, settings.trials // 3))
        need = len(ts.completed(study)) < settings.trials
        evaluator = None
        if need:
            work = cap.to(device) if cap.q.device != device else cap
            key = (tuple(work.q.shape), tuple(work.k.shape), str(work.q.dtype))
            evaluator = LayerEvaluator(work, cost_model=cost_model,
                                       dense_ms=dense_ms[key][0] if key in dense_ms else None)
            if cost_model == "measured" and key not in dense_ms:
                dense_ms[key] = (evaluator.dense_ms, evaluator.dense_backend)
            seeds = []
            if settings.analyze:
                b0 = space.seed_block_size()
                la = analyze_layer(work.q, work.k, PbsSettings(block_size=b0, segment_size=2 * b0, scale=work.scale,
                                                               softcap=work.softcap, window=work.window))
                lr.analysis = {
                    "oracle_density": float(la.oracle_density.mean()),
                    "oracle_density_perm": float(la.oracle_density_perm.mean()),
                    "pbs_recall": float(la.pbs_recall.mean()),
                    "pbs_recall_noperm": float(la.pbs_recall_noperm.mean()),
                }
                seeds = [space.params(c) for c in ts.seed_configs(space, la)]
            else:
                seeds = [space.params(c) for c in ts.seed_configs(space, None)]

            def objective(trial: optuna.Trial, evaluator=evaluator):
                cfg = space.suggest(trial)
                with ts.interruptible():  # Ctrl-C stops the computation at once, never a storage write
                    m = evaluator.evaluate(cfg)
                # Two attributes, not one per figure: each is a storage write (a commit on SQLite).
                trial.set_user_attr("config", _config_dict(cfg))
                trial.set_user_attr("measure", {k: getattr(m, k) for k in ("recall", "density", "predicted_cost", "time_ms")})
                # Feasible only when faster than dense attention (always available, error 0) and
                # not destroying the layer's output.
                trial.set_constraint("slower_than_dense", m.cost - 1.0)
                trial.set_constraint("layer_error", m.error - ts.MAX_LAYER_ERROR)
                return m.error, m.cost

            base_done = done_layers
            lr.trials_before, lr.trials_run = ts.run_study(
                study, objective, settings.trials, seeds=seeds,
                on_trial=lambda n, b=base_done: progress("trials", b + min(n, settings.trials), total),
                # A setting that runs out of GPU memory is a failed trial, not a failed tune.
                catch=(torch.cuda.OutOfMemoryError,),
            )
        else:
            lr.trials_before = len(ts.completed(study))
        lr.trials_complete = len(ts.completed(study))
        done_layers += settings.trials
        progress("trials", done_layers, total)
        for t in study.best_trials:  # feasible and non-dominated (constraints respected)
            lr.front.append(ts.trial_point(t))
        del evaluator
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 3. Allocation over the fronts.
    fronts = [pareto_front([Choice(p["error"], p["cost"], p) for p in lr.front]) for lr in results]
    for lr, f in zip(results, fronts):
        lr.front = [c.payload for c in f]
    weights = None
    best = fastest_speedup(fronts, weights)
    alloc = allocate(fronts, settings.target_speedup, weights)
    unit = "predicted" if cost_model == "predicted" else "measured"
    if alloc is None:
        raise TargetUnreachableError(settings.target_speedup, best, unit, N)
    del caps

    def build(picks) -> Any:
        for lr, f, i in zip(results, fronts, picks):
            lr.chosen = f[i].payload
        return _build_profile(results, settings, N, min_seq_len)

    # 4. Task accuracy on held-out retrieval prompts: walk down from the target allocation until
    # one loses at most max_accuracy_drop points (tune/accuracy.py).
    walk = None
    if settings.max_accuracy_drop is not None and tokenizer is None:
        notes.append("the model has no tokenizer, so task accuracy was not checked (retrieval prompts need one)")
    elif settings.max_accuracy_drop is not None:
        from .accuracy import walk_for_accuracy

        samples = settings.eval_samples or (6 if device.type == "cuda" else 2)
        walk = walk_for_accuracy(model, tokenizer, fronts, settings.target_speedup, settings.max_accuracy_drop,
                                 build, seq_len=N, samples=samples, weights=weights,
                                 max_positions=_max_positions(model), progress=progress)
        notes.extend(walk.notes)
        floor_pct = f"{100 * walk.floor:.0f}%"
        if walk.status == "blind":
            seen = ", ".join(f"{t} {100 * a:.0f}%" for t, a in walk.dense_by_task.items())
            notes.append(f"cannot check task accuracy: dense attention answers too few held-out retrieval prompts at "
                         f"{N} tokens ({seen}; the floor is {floor_pct}), so a loss could not show; the profile's "
                         "accuracy is unchecked (tune at a length where the model retrieves; see docs/eval.md)")
        else:
            if walk.blind_tasks:
                notes.append("left out of the accuracy check (dense below the " + floor_pct + " floor, blind): "
                             + ", ".join(f"{t} {100 * walk.dense_by_task[t]:.0f}%" for t in walk.blind_tasks))
            ok = walk.chosen
            if ok is None or ok.target < settings.target_speedup:
                pick = ok or max(walk.checks, key=lambda c: (c.accuracy, c.speedup))
                raise AccuracyUnreachableError(settings.target_speedup, settings.max_accuracy_drop,
                                               walk.dense_accuracy, pick.speedup, pick.accuracy, ok is not None, unit, N)
            alloc = allocate(fronts, ok.target, weights)
    for lr, f, i in zip(results, fronts, alloc.picks):
        lr.chosen = f[i].payload
    search = {"speedup": alloc.speedup, "cost": alloc.cost, "error_sum": alloc.error, "best_speedup": best}
    if dense_ms:
        ms, backend = next(iter(dense_ms.values()))
        search.update(dense_ms=ms, dense_backend=backend)
    profile = _build_profile(results, settings, N, min_seq_len)

    # 5. Validation on held-out text.
    validation = validate_profile(model, profile, heldout_ids, results, cost_model=cost_model,
                                  progress=progress)
    metrics = _metrics(validation, search, cost_model, device_name, dtype, settings.trials)
    if walk is not None and walk.status == "blind":
        metrics.update({
            "accuracy_check": "blind",
            "accuracy_tasks": ",".join(walk.tasks),
            "accuracy_prompts": int(walk.dense_n),
            "accuracy_dense": round(walk.dense_accuracy, 4),
            "accuracy_floor": walk.floor,
            "max_accuracy_drop": float(settings.max_accuracy_drop),
        })
    elif walk is not None:
        c = walk.chosen
        metrics.update({
            "accuracy_check": "checked",
            "accuracy_tasks": ",".join(walk.tasks),
            "accuracy_prompts": int(c.n),
            "accuracy_dense": round(walk.dense_accuracy, 4),
            "accuracy_pbs": round(c.accuracy, 4),
            "accuracy_drop_points": round(c.drop_points, 2),
            "accuracy_dense_only": int(c.dense_only),
            "accuracy_pbs_only": int(c.pbs_only),
            "accuracy_mcnemar_p": round(c.p_value, 4),
            "accuracy_floor": walk.floor,
            "max_accuracy_drop": float(settings.max_accuracy_drop),
        })
    profile.metrics = metrics
    for lr in results:
        err = (lr.heldout or {}).get("error")
        if err is not None and err > ts.MAX_LAYER_ERROR:
            # The search keeps every trial under the limit on calibration text; held-out text can
            # still push a chosen setting over it (seen on the demo model: 0.37-0.54 vs 0.35).
            notes.append(f"layer {lr.layer}: held-out output error {err:.2f} is above the {ts.MAX_LAYER_ERROR:g} "
                         "limit the search enforced on calibration text; the setting may be too sparse for other text")
    if validation["speedup"] < settings.target_speedup * 0.97:
        notes.append(
            f"on held-out text the {unit} speedup is {validation['speedup']:.2f}x, below the "
            f"{settings.target_speedup:g}x target reached on calibration text ({alloc.speedup:.2f}x): "
            "attention is denser there; tune for a higher target speedup (a margin) or on more typical text"
        )
    return TuneResult(
        model=name, seq_len=N, target_speedup=settings.target_speedup, objective=OBJECTIVE,
        cost_model=cost_model, device=device_name, dtype=dtype, storage=storage_label, study=base,
        trials=settings.trials, layers=results, search=search, validation=validation, metrics=metrics,
        out=str(settings.out), elapsed_s=time.perf_counter() - t0, notes=notes, profile=profile,
        accuracy=walk.to_dict() if walk is not None else None,
    )


ANSWER_ROOM = 64  # tokens a prompt at the model's limit leaves for its answer (eval needs <= 30)


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def validate_profile(model, profile, input_ids, layers: list[LayerResult], *, cost_model: str,
                     progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Held-out figures of `profile` on `input_ids` [1, N].

    Pass 1 (dense, capturing): each layer's setting on its held-out Q/K/V: error, recall,
    density, cost (measured on CUDA with a full-length timing, else predicted). Pass 2: the model
    with the profile applied. Logits of both give KL(dense || pbs) and the perplexities.
    Fills each LayerResult.heldout; returns whole-model figures.
    """
    import torch

    from pbs_kernels.integrations.hf import pbs_profile

    from ..capture import capture_during
    from .cost import dense_time_ms, pbs_time_ms
    from .layer import LayerCapture, LayerEvaluator

    N = int(input_ids.shape[1])
    by_layer = {lr.layer: lr for lr in layers}
    per_layer: dict[int, Any] = {}
    dense_ms: dict[tuple, float] = {}

    def on_layer(layer):
        idx = layer.layer
        cfg = profile.layer(idx)
        lr = by_layer.get(idx)
        if lr is None:
            return
        if cfg.dense or lr.unsupported is not None:
            lr.heldout = {"error": 0.0, "recall": 1.0, "density": 1.0, "cost": 1.0, "predicted_cost": 1.0}
            per_layer[idx] = lr.heldout
            return
        cap = LayerCapture.of(layer, layer.q.contiguous(), layer.k.contiguous(), layer.v.contiguous())
        key = (tuple(cap.q.shape), tuple(cap.k.shape), str(cap.q.dtype))
        ev = LayerEvaluator(cap, cost_model="predicted")
        m = ev.evaluate(cfg)
        cost = m.cost
        time_ms = None
        if cost_model == "measured":
            if key not in dense_ms:
                dense_ms[key] = dense_time_ms(cap.q, cap.k, cap.v, scale=cap.scale)[0]
            time_ms = pbs_time_ms(cap.q, cap.k, cap.v, scale=cap.scale, **cfg.plan_kwargs(), **cap.features())
            cost = time_ms / dense_ms[key]
        lr.heldout = {"error": m.error, "recall": m.recall, "density": m.density, "cost": cost,
                      "predicted_cost": m.predicted_cost, "time_ms": time_ms,
                      "dense_ms": dense_ms.get(key)}
        per_layer[idx] = lr.heldout
        del ev

    progress("validation", 0, 2)
    targets = input_ids[0, 1:]
    dense = capture_during(model, lambda: _final_hidden_and_head(model, input_ids), on_layer)
    progress("validation", 1, 2)
    with torch.inference_mode():
        with pbs_profile(model, profile):
            pbs = _final_hidden_and_head(model, input_ids)
        stats = _logit_stats(dense, pbs, targets)
    progress("validation", 2, 2)
    del dense, pbs

    L = max(1, len(per_layer))
    mean = lambda k: sum(v[k] for v in per_layer.values()) / L  # noqa: E731
    # Layers have the same shape, so whole-model time is the mean of the per-layer costs.
    cost = mean("cost")
    pcost = mean("predicted_cost")
    ppl_d, ppl_p = math.exp(stats["nll_dense"]), math.exp(stats["nll_pbs"])
    return {
        "n_tokens": N,
        "speedup": 1.0 / cost,
        "predicted_speedup": 1.0 / pcost,
        "measured_speedup": 1.0 / cost if cost_model == "measured" else None,
        "density": mean("density"),
        "recall": mean("recall"),
        "error": mean("error"),
        "kl": stats["kl"],
        "ppl_dense": ppl_d,
        "ppl_pbs": ppl_p,
        "ppl_change": ppl_p / ppl_d - 1.0,
    }


def _metrics(validation, search, cost_model, device_name, dtype, trials) -> dict[str, Any]:
    """The profile's `metrics` block: flat numbers and strings (profiles/README.md)."""
    r = lambda x, n=4: None if x is None else round(float(x), n)  # noqa: E731
    m = {
        "cost_model": cost_model,
        "predicted_speedup": r(validation["predicted_speedup"], 3),
    }
    if validation.get("measured_speedup") is not None:
        m["measured_speedup"] = r(validation["measured_speedup"], 3)
    m.update({
        "search_speedup": r(search["speedup"], 3),
        "density": r(validation["density"]),
        "recall": r(validation["recall"]),
        "error": r(validation["error"]),
        "kl": r(validation["kl"], 6),
        "ppl_dense": r(validation["ppl_dense"]),
        "ppl_pbs": r(validation["ppl_pbs"]),
        "ppl_change": r(validation["ppl_change"], 5),
        "trials_per_layer": int(trials),
        "device": device_name,
        "dtype": dtype,
    })
    return m
