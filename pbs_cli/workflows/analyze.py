"""The workflow behind `pbs analyze`: one prefill, per-layer sparsity figures, pictures.

    report = run_analysis(model, input_ids, PbsSettings(block_size=128), coverage=0.9, progress=report_fn)
    pictures = render_pictures(report)     # {"density_grid.png": b"...", ...}; the caller saves them

`run_analysis` registers a capture attention function (pbs_kernels.integrations.hf), runs one
forward pass, and at each selected layer measures the post-RoPE Q and K with
`pbs_kernels.analysis.analyze_layer` (exact softmax in chunks, never N x N). The pass stops after
the last selected layer. It returns plain dataclasses; it prints nothing.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from typing import Any

from pbs_kernels.settings import PbsSettings

from .capture import CapturedLayer, capture_prefill
from .errors import LayerMissing, LayerSpecInvalid
from .progress import ProgressFn, no_progress

__all__ = [
    "AnalysisReport",
    "HeadReport",
    "Heatmap",
    "LayerReport",
    "parse_layers",
    "run_analysis",
    "render_pictures",
]

VERDICT_MARGIN = 0.05


@dataclass
class HeadReport:
    """One query head. Densities are computed tiles / causal tiles (docs/design.md, Metrics).

    oracle_density[_perm]: fewest key blocks per query block that hold `coverage` of its
    attention mass, keys in original [PBS-permuted] order. pbs_density/pbs_recall: PBS's own
    estimated selection at `threshold` with permutation (…_noperm: without). sink_mass: mass on
    the first key block (queries past the first block); local_mass: mass on the query's own and
    previous key block. oracle_density_at_recall: the fewest tiles (permuted order) an oracle
    that knows every tile's mass needs for PBS's recall; pbs_work: tiles PBS computes (own-segment
    tiles above the diagonal and vertical keys included); their ratio is the selection efficiency.
    With vertical keys on, pbs_recall[_noperm] count their mass too, and
    pbs_vertical_density[_noperm] is their work in tiles per causal tile (analysis.analyze_layer).
    verdict: "helps" when permuting lowers the oracle density by more than the margin (relative),
    "hurts" when it raises it by more, else "neutral".
    """

    head: int
    kv_head: int
    oracle_density: float
    oracle_density_perm: float
    pbs_density: float
    pbs_recall: float
    pbs_density_noperm: float
    pbs_recall_noperm: float
    sink_mass: float
    local_mass: float
    verdict: str
    oracle_density_at_recall: float = float("nan")
    pbs_work: float = float("nan")
    pbs_vertical_density: float = 0.0
    pbs_vertical_density_noperm: float = 0.0


@dataclass
class LayerReport:
    """Per-layer means over heads, the heads, and `pbs_fallback`: why PBS would run dense
    attention on this layer in the model (e.g. an unsupported head dim), None when it applies.

    attention: "windowed" when the model runs the layer with a sliding window shorter than the
    prompt (sliding_window), else "full"; a windowed layer is analysed inside its window (the
    oracle, recall and PBS's selection all see only the window's keys) and window_density is the
    share of causal tiles the window alone leaves, the work of exact windowed attention.
    softcap: the model's logit soft-capping, applied to the true attention."""

    layer: int
    oracle_density: float
    oracle_density_perm: float
    pbs_density: float
    pbs_recall: float
    sink_mass: float
    local_mass: float
    helps: int
    neutral: int
    hurts: int
    pbs_fallback: str | None
    heads: list[HeadReport]
    selection_efficiency: float = float("nan")  # oracle tiles at PBS's recall / PBS's tiles
    pbs_vertical_density: float = 0.0
    attention: str = "full"
    sliding_window: int | None = None
    softcap: float | None = None
    window_density: float = 1.0


@dataclass
class Heatmap:
    """Block-attention maps of one head for the pictures: [NB, NB] mean mass of query block i
    on key block j, keys in original and in permuted order."""

    kind: str  # "most sparse" | "least sparse"
    layer: int
    head: int
    oracle_density: float
    oracle_density_perm: float
    block_mass: Any
    block_mass_perm: Any


@dataclass
class AnalysisReport:
    model: str
    seq_len: int
    block_size: int
    segment_size: int
    coverage: float
    threshold: float
    verdict_margin: float
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: list[LayerReport]
    summary: dict[str, Any]
    elapsed_s: float
    device: str = ""
    dtype: str = ""
    input: str = "synthetic"
    vertical_keys: int = 0  # pbs_attention's knob, applied to PBS's selection figures
    peak_gpu_memory_gib: float | None = None  # torch's peak allocation during the analysis (CUDA only)
    notes: list[str] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)
    heatmaps: list[Heatmap] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: everything but the heatmap arrays (those go to the PNGs)."""
        from .jsonable import to_jsonable

        out = {}
        for name in self.__dataclass_fields__:
            if name != "heatmaps":
                out[name] = to_jsonable(getattr(self, name))
        return out

    def ranked_layers(self) -> list[LayerReport]:
        """Layers from sparsest to densest (by oracle density with permutation)."""
        return sorted(self.layers, key=lambda r: (r.oracle_density_perm, r.layer))


def parse_layers(spec: str | None, num_layers: int) -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; None -> None (all). LayerSpecInvalid for a list that does not
    parse, LayerMissing for indices past the model."""
    if spec is None or not str(spec).strip():
        return None
    chosen: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:  # '0,,3': a typo, not a skip
            raise LayerSpecInvalid(f"{spec!r} has an empty item between commas; use e.g. 0,2,5-7")
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise LayerSpecInvalid(f"{spec!r}: {part!r} is not a layer index or range; use e.g. 0,2,5-7") from None
        if a < 0 or b < a:
            raise LayerSpecInvalid(f"{spec!r}: {part!r} is not a valid range; use e.g. 0,2,5-7")
        chosen.update(range(a, b + 1))
    if not chosen:
        raise LayerSpecInvalid(f"{spec!r} names no layer; use e.g. 0,2,5-7")
    bad = [i for i in sorted(chosen) if i >= num_layers]
    if bad:
        raise LayerMissing(bad[0], num_layers)
    return sorted(chosen)


def _verdict(d_orig: float, d_perm: float, margin: float) -> str:
    if d_orig <= 0:
        return "neutral"
    change = (d_orig - d_perm) / d_orig
    if change > margin:
        return "helps"
    if change < -margin:
        return "hurts"
    return "neutral"


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


def run_analysis(
    model,
    input_ids,
    settings: PbsSettings | None = None,
    *,
    layers: list[int] | None = None,
    coverage: float = 0.9,
    verdict_margin: float = VERDICT_MARGIN,
    model_name: str = "",
    chunk_bytes: int | None = None,
    progress: ProgressFn = no_progress,
) -> AnalysisReport:
    """Analyse `model`'s attention on one prompt (`input_ids` [1, N]).

    settings: the PBS settings whose figures are measured (`pbs_kernels.settings.PbsSettings`,
    checked when built; default: the method's defaults); each layer adds its own scale,
    soft-cap and window. layers: layer indices to analyse (None: all). The forward pass stops
    after the last one. Raises the capture's errors (workflows.capture.capture_prefill) when
    nothing can be captured.
    """
    import torch

    from pbs_kernels.analysis import analyze_layer

    from .capture import model_layers

    settings = PbsSettings() if settings is None else settings
    t0 = time.perf_counter()
    on_cuda = input_ids.is_cuda
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(input_ids.device)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"run_analysis: input_ids must be [1, N], got {tuple(input_ids.shape)}")
    N = int(input_ids.shape[1])
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    all_layers = model_layers(model, name)
    selected = all_layers if layers is None else sorted(set(layers))

    results: dict[int, Any] = {}
    shapes: dict[str, int] = {}
    fallbacks: dict[int, str | None] = {}
    softcaps: dict[int, float | None] = {}
    extremes: dict[str, Heatmap] = {}
    total = len(selected)
    progress("layers", 0, total)

    def on_layer(layer: CapturedLayer) -> None:
        q, k = layer.q, layer.k
        window = layer.sliding_window
        layer_settings = settings.replace(scale=layer.scale, softcap=layer.softcap,
                                          window=window if window is not None and window < N else None)
        la = analyze_layer(q, k, layer_settings, coverage=coverage, return_maps=True, chunk_bytes=chunk_bytes)
        shapes.update(num_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[3])
        fallbacks[layer.layer] = layer.fallback
        softcaps[layer.layer] = layer.softcap
        _keep_extremes(extremes, layer.layer, la)
        la.block_mass = la.block_mass_perm = None  # kept only for the extreme heads
        results[layer.layer] = la
        progress("layers", len(results), total)

    capture_prefill(model, input_ids, on_layer, layers=selected, name=name)

    G = max(1, shapes["num_heads"] // shapes["num_kv_heads"])
    layer_reports = []
    for idx in selected:
        la = results[idx]
        heads = []
        for h in range(shapes["num_heads"]):
            d0, d1 = float(la.oracle_density[h]), float(la.oracle_density_perm[h])
            heads.append(HeadReport(
                head=h, kv_head=h // G, oracle_density=d0, oracle_density_perm=d1,
                pbs_density=float(la.pbs_density[h]), pbs_recall=float(la.pbs_recall[h]),
                pbs_density_noperm=float(la.pbs_density_noperm[h]), pbs_recall_noperm=float(la.pbs_recall_noperm[h]),
                sink_mass=float(la.sink_mass[h]), local_mass=float(la.local_mass[h]),
                verdict=_verdict(d0, d1, verdict_margin),
                oracle_density_at_recall=float(la.oracle_density_at_recall[h]), pbs_work=float(la.pbs_work[h]),
                pbs_vertical_density=float(la.pbs_vertical_density[h]),
                pbs_vertical_density_noperm=float(la.pbs_vertical_density_noperm[h]),
            ))
        layer_reports.append(LayerReport(
            layer=idx,
            oracle_density=_mean(h.oracle_density for h in heads),
            oracle_density_perm=_mean(h.oracle_density_perm for h in heads),
            pbs_density=_mean(h.pbs_density for h in heads),
            pbs_recall=_mean(h.pbs_recall for h in heads),
            sink_mass=_mean(h.sink_mass for h in heads),
            local_mass=_mean(h.local_mass for h in heads),
            helps=sum(h.verdict == "helps" for h in heads),
            neutral=sum(h.verdict == "neutral" for h in heads),
            hurts=sum(h.verdict == "hurts" for h in heads),
            pbs_fallback=fallbacks.get(idx),
            heads=heads,
            selection_efficiency=la.selection_efficiency,
            pbs_vertical_density=_mean(h.pbs_vertical_density for h in heads),
            attention="full" if la.window is None else "windowed",
            sliding_window=la.window,
            softcap=softcaps.get(idx),
            window_density=float(la.window_density),
        ))

    all_heads = [(lr.layer, h) for lr in layer_reports for h in lr.heads]
    ranked = sorted(layer_reports, key=lambda r: (r.oracle_density_perm, r.layer))
    summary = {
        "layers_analyzed": len(layer_reports),
        "heads_analyzed": len(all_heads),
        "oracle_density": _mean(h.oracle_density for _, h in all_heads),
        "oracle_density_perm": _mean(h.oracle_density_perm for _, h in all_heads),
        "pbs_density": _mean(h.pbs_density for _, h in all_heads),
        "pbs_recall": _mean(h.pbs_recall for _, h in all_heads),
        # Every head has the same causal tile count, so the ratio of mean densities is the ratio
        # of tile counts summed over heads and layers (pbs_kernels.metrics.selection_efficiency).
        "selection_efficiency": _mean(h.oracle_density_at_recall for _, h in all_heads)
        / max(_mean(h.pbs_work for _, h in all_heads), 1e-12),
        "estimator": settings.estimator,
        "threshold_mass": settings.threshold_mass,
        "vertical_keys": int(settings.vertical_keys),
        "pbs_vertical_density": _mean(h.pbs_vertical_density for _, h in all_heads),
        "sink_mass": _mean(h.sink_mass for _, h in all_heads),
        "local_mass": _mean(h.local_mass for _, h in all_heads),
        "heads_helps": sum(h.verdict == "helps" for _, h in all_heads),
        "heads_neutral": sum(h.verdict == "neutral" for _, h in all_heads),
        "heads_hurts": sum(h.verdict == "hurts" for _, h in all_heads),
        "windowed_layers": [r.layer for r in layer_reports if r.attention == "windowed"],
        "sparsest_layers": [r.layer for r in ranked[:3]],
        "densest_layers": [r.layer for r in ranked[::-1][:3]],
        "most_sparse_head": _head_ref(extremes.get("most sparse")),
        "least_sparse_head": _head_ref(extremes.get("least sparse")),
    }
    return AnalysisReport(
        model=name,
        seq_len=N,
        block_size=settings.block_size,
        segment_size=settings.segment_size,
        coverage=float(coverage),
        threshold=settings.threshold,
        verdict_margin=float(verdict_margin),
        num_layers=len(all_layers),
        num_heads=shapes["num_heads"],
        num_kv_heads=shapes["num_kv_heads"],
        head_dim=shapes["head_dim"],
        layers=layer_reports,
        summary=summary,
        elapsed_s=time.perf_counter() - t0,
        device=str(input_ids.device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        peak_gpu_memory_gib=torch.cuda.max_memory_allocated(input_ids.device) / 2**30 if on_cuda else None,
        heatmaps=[extremes[k] for k in ("most sparse", "least sparse") if k in extremes],
        vertical_keys=int(settings.vertical_keys),
    )


def _head_ref(hm: Heatmap | None) -> dict[str, Any] | None:
    if hm is None:
        return None
    return {"layer": hm.layer, "head": hm.head, "oracle_density": hm.oracle_density,
            "oracle_density_perm": hm.oracle_density_perm}


def _keep_extremes(extremes: dict[str, Heatmap], layer: int, la) -> None:
    """Keep the maps of the sparsest and densest head seen so far (by oracle density with
    permutation, the figure PBS can reach); all other maps are dropped to bound memory."""
    d = la.oracle_density_perm
    for kind, h, better in (
        ("most sparse", int(d.argmin()), lambda new, old: new < old),
        ("least sparse", int(d.argmax()), lambda new, old: new > old),
    ):
        cur = extremes.get(kind)
        if cur is None or better(float(d[h]), cur.oracle_density_perm):
            extremes[kind] = Heatmap(
                kind=kind, layer=layer, head=h,
                oracle_density=float(la.oracle_density[h]), oracle_density_perm=float(d[h]),
                block_mass=la.block_mass[h].clone(), block_mass_perm=la.block_mass_perm[h].clone(),
            )


# ---------------------------------------------------------------------------------------------
# Pictures.

_MAX_PIXELS = 256  # block maps larger than this are mean-pooled for display


def _display(m):
    import torch

    nb = m.shape[-1]
    if nb > _MAX_PIXELS:
        f = math.ceil(nb / _MAX_PIXELS)
        pad = f * math.ceil(nb / f) - nb
        m = torch.nn.functional.pad(m, (0, pad, 0, pad))
        m = torch.nn.functional.avg_pool2d(m[None, None], f)[0, 0]
    # log10 of the mass, floored: attention spans many orders of magnitude.
    return torch.log10(m.clamp_min(1e-6)).numpy()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def render_pictures(report: AnalysisReport) -> dict[str, bytes]:
    """PNG pictures by file name: heatmap_most_sparse.png / heatmap_least_sparse.png (block
    attention before and after permutation, side by side) and density_grid.png (layer x head
    oracle density without and with permutation). Rendered in memory, so the caller writes all
    the results in one place (and keeps them if the disk fails)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    pictures: dict[str, bytes] = {}
    for hm in report.heatmaps:
        fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
        for ax, m, label, dens in (
            (axes[0], hm.block_mass, "original key order", hm.oracle_density),
            (axes[1], hm.block_mass_perm, "PBS-permuted key order", hm.oracle_density_perm),
        ):
            im = ax.imshow(_display(m), cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
            ax.set_title(f"{label}\noracle density {dens:.3f} at coverage {report.coverage:g}", fontsize=10)
            ax.set_xlabel(f"key block ({report.block_size} tokens)")
            ax.set_ylabel("query block")
            # Blocks are whole: matplotlib's default ticks put 2.5 or 7.5 on a 16-block axis.
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=axes, shrink=0.8, label="log10 attention mass")
        fig.suptitle(f"{report.model}: layer {hm.layer} head {hm.head} ({hm.kind}), {report.seq_len} tokens", y=1.02)
        name = "heatmap_most_sparse.png" if hm.kind == "most sparse" else "heatmap_least_sparse.png"
        pictures[name] = _png(fig)
        plt.close(fig)

    if report.layers:
        layers = [lr.layer for lr in report.layers]
        grid0 = np.array([[h.oracle_density for h in lr.heads] for lr in report.layers])
        grid1 = np.array([[h.oracle_density_perm for h in lr.heads] for lr in report.layers])
        height = min(12.0, 2.0 + 0.3 * len(layers))
        width = min(16.0, 3.0 + 0.35 * grid0.shape[1]) * 2
        fig, axes = plt.subplots(1, 2, figsize=(width, height), squeeze=False)
        vmax = float(max(grid0.max(), grid1.max(), 1e-6))
        for ax, grid, label in ((axes[0][0], grid0, "original order"), (axes[0][1], grid1, "PBS-permuted")):
            im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_title(f"oracle density, {label}", fontsize=10)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            step = max(1, len(layers) // 16)
            ax.set_yticks(range(0, len(layers), step))
            ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), step)])
            if grid.size <= 64:  # few cells: print the values too
                for (i, j), v in np.ndenumerate(grid):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if v < 0.6 * vmax else "black")
        fig.colorbar(im, ax=axes, shrink=0.8, label=f"tiles for {report.coverage:g} of the mass / causal tiles")
        fig.suptitle(f"{report.model}: {report.seq_len} tokens, block {report.block_size}, segment {report.segment_size}",
                     y=1.04)
        pictures["density_grid.png"] = _png(fig)
        plt.close(fig)
    return pictures
