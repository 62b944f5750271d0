"""Which accuracy proxy ranks PBS settings the way task accuracy does.

    study = proxy_study(model, tokenizer, calib_ids, settings=grid(), seq_len=2048)
    study.spearman   # proxy -> Spearman rank correlation with task accuracy over the settings

Each setting is one LayerConfig applied to every layer. For each, on the same inputs:

* task accuracy (run_eval on the retrieval tasks, exact match);
* per-layer proxies on one dense prefill of `calib_ids` (each layer's own dense Q/K/V, as tune
  scores trials): output error over all rows (tune's objective) and recall. (The output error
  of the last query block, "tail error", was one until those rows became exact under every
  setting, issue 21: it measured rounding since.)
* whole-model proxies with the profile applied: KL(dense || pbs) of the next-token
  distributions and the perplexity change on `calib_ids`.

A proxy "agrees" when ranking the settings by it (less error is better, more recall is better)
gives the order of their task accuracy: rho = +1. Ties take average ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..progress import ProgressFn, no_progress
from .run import run_eval

__all__ = ["PROXIES", "ProxyRow", "ProxyStudy", "grid", "proxy_study", "spearman"]

# proxy -> sign that makes "larger is better" (accuracy-like) for the rank correlation.
PROXIES = {"layer_error": -1, "recall": +1, "kl": -1, "ppl_change": -1}


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1  # average rank of a tie group
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either side
    is constant or there are fewer than 2 points."""
    if len(x) != len(y):
        raise ValueError("spearman: x and y differ in length")
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(list(x)), _ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def grid(thresholds: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0), *, block_size: int = 64,
         segment_size: int = 256):
    """Settings: thresholds x permute off/on, every layer alike, PBS from any length."""
    from pbs_kernels.profile import LayerConfig

    return [LayerConfig(block_size=block_size, segment_size=segment_size, threshold=float(t), permute=p,
                        min_seq_len=0) for t in thresholds for p in (False, True)]


@dataclass
class ProxyRow:
    setting: dict[str, Any]
    accuracy: float
    n: int
    ci_low: float
    ci_high: float
    layer_error: float
    recall: float
    density: float
    kl: float
    ppl_change: float


@dataclass
class ProxyStudy:
    seq_len: int
    tasks: list[str]
    samples: int
    depths: list[float]
    dense_accuracy: float
    rows: list[ProxyRow]
    spearman: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> str:
        """The proxy with the highest rank correlation (ties: the listed order of PROXIES)."""
        scored = [(v, -i, k) for i, (k, v) in enumerate(self.spearman.items()) if not math.isnan(v)]
        return max(scored)[2] if scored else "layer_error"


def _layer_proxies(model, ids, settings, progress: ProgressFn) -> list[dict[str, float]]:
    """Per setting: mean over layers of output error, recall and density, each
    layer scored on its own dense inputs (as tune's per-layer studies do)."""
    import torch

    from pbs_kernels.attention import pbs_plan
    from pbs_kernels.metrics import output_error, recall_from_lse

    from ..capture import capture_prefill

    sums = [dict.fromkeys(("layer_error", "recall", "density"), 0.0) for _ in settings]
    n_layers = 0

    def on_layer(layer) -> None:
        nonlocal n_layers
        n_layers += 1
        q, k, v, scale = layer.q.float(), layer.k.float(), layer.v.float(), layer.scale
        N = q.shape[2]
        ref_b = 64 if N % 64 == 0 else 16
        with torch.no_grad():
            full = pbs_plan(q, k, v, block_size=ref_b, segment_size=ref_b, threshold=1.0, permute=False, scale=scale)
            ref, ref_lse = full.attend(q, return_lse=True)
            for s, cfg in zip(sums, settings):
                plan = pbs_plan(q, k, v, block_size=cfg.block_size, segment_size=cfg.segment_size,
                                threshold=cfg.threshold, permute=cfg.permute, scale=scale)
                out, lse = plan.attend(q, return_lse=True)
                s["layer_error"] += output_error(out, ref)
                s["recall"] += recall_from_lse(lse, ref_lse)
                s["density"] += float(plan.density_per_head().float().mean())
        progress("per-layer proxies", n_layers, None)

    capture_prefill(model, ids, on_layer)
    return [{k: v / max(n_layers, 1) for k, v in s.items()} for s in sums]


def _model_proxies(model, ids, profile) -> dict[str, float]:
    import torch

    from pbs_kernels.integrations.hf import pbs_profile

    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
        with pbs_profile(model, profile, backend="auto"):
            sparse = model(input_ids=ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
    t = ids[0, 1:, None]
    kl = float((dense.exp() * (dense - sparse)).sum(-1).mean())
    nll_d = -float(dense.gather(1, t).mean())
    nll_p = -float(sparse.gather(1, t).mean())
    return {"kl": max(kl, 0.0), "ppl_change": math.exp(nll_p - nll_d) - 1.0}


def proxy_study(model, tokenizer, calib_ids, *, settings=None, seq_len: int = 2048,
                tasks: Sequence[str] = ("niah_single", "niah_multikey"),
                depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), samples: int = 2, seed: int = 0,
                progress: ProgressFn = no_progress) -> ProxyStudy:
    """Measure task accuracy and every proxy for each setting (see the module docstring).
    calib_ids: [1, N] ids of a text the proxies are measured on (tune's calibration text)."""
    from pbs_kernels.profile import PbsProfile

    settings = list(settings or grid())
    layer = _layer_proxies(model, calib_ids, settings, progress)
    dense = run_eval(model, tokenizer, tasks=tasks, seq_lens=[seq_len], depths=depths, samples=samples, seed=seed)
    rows = []
    for i, cfg in enumerate(settings):
        prof = PbsProfile(model=None, defaults=cfg)
        r = run_eval(model, tokenizer, profile=prof, tasks=tasks, seq_lens=[seq_len], depths=depths,
                     samples=samples, seed=seed, dense=False)
        c = r.overall["pbs"]
        m = _model_proxies(model, calib_ids, prof)
        rows.append(ProxyRow(
            setting={"block_size": cfg.block_size, "segment_size": cfg.segment_size, "threshold": cfg.threshold,
                     "permute": cfg.permute},
            accuracy=c.accuracy, n=c.n, ci_low=c.ci_low, ci_high=c.ci_high, **layer[i], **m))
        progress("settings", i + 1, len(settings))
    acc = [r.accuracy for r in rows]
    rho = {p: spearman(acc, [sign * getattr(r, p) for r in rows]) for p, sign in PROXIES.items()}
    return ProxyStudy(seq_len, list(tasks), samples, list(depths), dense.overall["dense"].accuracy, rows, rho)


def markdown_table(study: ProxyStudy) -> str:
    lines = ["| proxy | Spearman rho with task accuracy |", "|---|---|"]
    for p, v in study.spearman.items():
        lines.append(f"| {p} | {'n/a' if math.isnan(v) else f'{v:+.2f}'} |")
    lines += ["", "| threshold | permute | accuracy % [95% CI] (n) | layer error | recall | density | KL | ppl change |",
              "|---|---|---|---|---|---|---|---|"]
    for r in study.rows:
        lines.append(
            f"| {r.setting['threshold']:g} | {'on' if r.setting['permute'] else 'off'} | "
            f"{100 * r.accuracy:.0f} [{100 * r.ci_low:.0f}, {100 * r.ci_high:.0f}] ({r.n}) | {r.layer_error:.3f} | "
            f"{r.recall:.3f} | {r.density:.3f} | {r.kl:.4f} | {100 * r.ppl_change:+.2f}% |")
    return "\n".join(lines)
