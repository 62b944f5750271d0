"""Eval reports: JSON, Markdown and a needle heatmap PNG, rendered to text and bytes.

    files = report_files(result)   # {"eval.json": "...", "eval.md": "...", "eval_needle.png": b"..."}

matplotlib is imported only when the PNG is drawn.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .run import CellResult, EvalResult, PairedCell
from .tasks import DEPTH_TASKS

__all__ = ["heatmap_png", "markdown", "report_files", "verdict_line"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell_text(c: CellResult | None) -> str:
    if c is None:
        return "-"
    return f"{_pct(c.accuracy)} [{_pct(c.ci_low)}, {_pct(c.ci_high)}] ({c.correct}/{c.n})"


def verdict_line(c: PairedCell, floor: float) -> str:
    """One line on what a paired cell shows: blind, a drop, or no evidence of one (with the
    largest drop the interval leaves open)."""
    where = "all" if c.seq_len is None else f"{c.task} at {c.seq_len}" + ("" if c.depth is None else f", depth {c.depth:g}")
    if c.verdict == "blind":
        return (f"{where}: blind: dense answers {c.both + c.dense_only}/{c.n} ({100 * c.dense_accuracy:.0f}%, below "
                f"the {100 * floor:.0f}% floor), so this cell cannot show a drop")
    span = f"[{100 * c.drop_low:+.0f}, {100 * c.drop_high:+.0f}]"
    lost = f"{c.dense_only} lost, {c.pbs_only} won, McNemar p {c.p_value:.2f}"
    if c.verdict == "drop":
        return f"{where}: DROP of {100 * c.drop:+.0f} points {span} ({lost})"
    return (f"{where}: no evidence of a drop ({100 * c.drop:+.0f} points {span}: a drop up to "
            f"{100 * c.drop_high:.0f} points is not ruled out; {lost})")


def _paired_rows(cells: list[PairedCell], result: EvalResult) -> list[str]:
    rows = []
    for c in cells:
        ran = "" if c.seq_len is None else ran_note(result, c.seq_len)  # what the profile ran there
        rows.append(f"| {c.task} | {c.seq_len if c.seq_len is not None else '-'} | "
                    f"{'-' if c.depth is None else f'{c.depth:g}'} | {c.both + c.dense_only}/{c.n} | "
                    f"{c.both + c.pbs_only}/{c.n}{ran} | {c.dense_only} | {c.pbs_only} | "
                    f"{100 * c.drop:+.1f} [{100 * c.drop_low:+.1f}, {100 * c.drop_high:+.1f}] | {c.p_value:.3f} | "
                    f"{c.verdict} |")
    return rows


def _depth_text(d: float | None) -> str:
    return "-" if d is None else f"{d:g}"


def markdown(result: EvalResult) -> str:
    """The result as Markdown: summary per task and length, then every cell. Accuracy in %,
    95% Wilson interval in brackets, correct/n in parentheses."""
    has_pbs = "pbs" in result.methods
    lines = [
        f"# pbs eval: {result.model}",
        "",
        f"- profile: {result.profile or 'none (dense only)'}",
        f"- tasks: {', '.join(result.tasks)}; lengths: {', '.join(map(str, result.seq_lens))}; "
        f"depths: {', '.join(f'{d:g}' for d in result.depths)}; samples per cell: {result.samples}; seed: {result.seed}",
        f"- prompts: {result.grammar} grammar, haystack {result.haystack}; scored by exact match of greedy decoding",
        "- accuracy in %, [95% Wilson interval], (correct/n)",
        "",
    ]
    head = ["task", "length", "dense"] + (["pbs", "drop (points)"] if has_pbs else [])
    lines += ["## Summary", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(c.task, c.seq_len, c.method): c for c in result.summary}
    for task in result.tasks:
        for n in result.seq_lens:
            d = by.get((task, n, "dense"))
            row = [task, str(n), _cell_text(d)]
            if has_pbs:
                p = by.get((task, n, "pbs"))
                drop = "-" if d is None or p is None else f"{100 * (d.accuracy - p.accuracy):+.1f}"
                row += [_cell_text(p) + ran_note(result, n), drop]
            lines.append("| " + " | ".join(row) + " |")
    o = result.overall
    row = ["all", "-", _cell_text(o.get("dense"))]
    if has_pbs:
        row += [_cell_text(o.get("pbs")), "-" if result.drop_points is None else f"{result.drop_points:+.1f}"]
    lines.append("| " + " | ".join(row) + " |")

    if result.paired:
        head = ["task", "length", "depth", "dense", "pbs", "dense only", "pbs only", "drop (points) [95%]",
                "McNemar p", "verdict"]
        lines += ["", "## Paired: dense and PBS on the same prompts", "",
                  f"Drop = dense minus PBS accuracy; its 95% interval is for paired data (Newcombe); McNemar's "
                  f"exact test uses only the prompts one method answers and the other misses. A cell where dense "
                  f"answers less than {100 * result.floor:.0f}% is blind: it cannot show a drop.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += _paired_rows(result.paired, result)
        if result.paired_overall is not None:
            lines += _paired_rows([result.paired_overall], result)
        lines += _paired_rows(sorted(result.paired_depths, key=lambda c: (c.task, c.seq_len, c.depth)), result)
        lines += [""] + [f"- {verdict_line(c, result.floor)}" for c in result.paired]
        if result.paired_overall is not None:
            lines.append(f"- {verdict_line(result.paired_overall, result.floor)}")
    if result.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result.notes]

    head = ["task", "length", "depth", "dense"] + (["pbs"] if has_pbs else [])
    lines += ["", "## Cells", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = {(c.task, c.seq_len, c.depth, c.method): c for c in result.results}
    keys = sorted({(c.task, c.seq_len, c.depth) for c in result.results},
                  key=lambda k: (result.tasks.index(k[0]), k[1], -1 if k[2] is None else k[2]))
    for t, n, dep in keys:
        row = [t, str(n), _depth_text(dep), _cell_text(cells.get((t, n, dep, "dense")))]
        if has_pbs:
            row.append(_cell_text(cells.get((t, n, dep, "pbs"))) + ran_note(result, n))
        lines.append("| " + " | ".join(row) + " |")
    secs = ", ".join(f"{m} {s:.1f} s" for m, s in result.seconds.items())
    lines += ["", f"Time: {secs}.", ""]
    return "\n".join(lines)


def heatmap_png(result: EvalResult, task: str | None = None) -> bytes | None:
    """Needle accuracy as a depth x length heatmap, dense beside pbs, as PNG bytes; None when no
    depth task (niah_single, niah_multikey) was run."""
    tasks = [t for t in (task,) if t] or [t for t in DEPTH_TASKS if t in result.tasks]
    if not tasks:
        return None
    task = tasks[0]
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    depths = sorted({c.depth for c in result.results if c.task == task and c.depth is not None})
    lens = sorted({c.seq_len for c in result.results if c.task == task})
    cells = {(c.seq_len, c.depth, c.method): c for c in result.results if c.task == task}
    # At least 2.4 inches a panel: narrower ones make the two axis labels overlap.
    fig, axes = plt.subplots(1, len(result.methods), figsize=(1.2 + max(2.4, 1.3 * len(lens)) * len(result.methods),
                                                              1.6 + 0.45 * len(depths)),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, method in zip(axes[0], result.methods):
        grid = np.full((len(depths), len(lens)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lens):
                c = cells.get((n, d, method))
                if c is not None:
                    grid[i, j] = c.accuracy
                    ax.text(j, i, f"{c.correct}/{c.n}", ha="center", va="center", fontsize=8,
                            color="black" if c.accuracy > 0.5 else "white")
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lens)), [_short(n) + (ran_note(result, n).replace(" (", "\n(")
                                                      if method == "pbs" else "") for n in lens])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        acc = [cells[k].accuracy for k in cells if k[2] == method]
        mean = sum(acc) / len(acc) if acc else float("nan")
        ran = {result.pbs_ran.get(n, "pbs") for n in lens} if method == "pbs" else {method}
        name = "pbs profile, ran dense" if ran == {"dense"} else method
        ax.set_title(f"{name}: {100 * mean:.0f}%", fontsize=10)
    fig.suptitle(f"{task}, {result.model}" + (f" with {Path(result.profile).name}" if result.profile else ""),
                 fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="exact-match accuracy")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def ran_note(result: EvalResult, n: int) -> str:
    """' (ran dense)' or ' (pbs on 2 of 4 layers)' after a pbs figure at length n; '' where
    PBS ran on every layer."""
    label = result.pbs_ran.get(n, "pbs")
    return "" if label == "pbs" else f" (ran {label})" if label == "dense" else f" ({label})"


def _short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def report_files(result: EvalResult, *, stem: str = "eval") -> dict[str, str | bytes]:
    """The reports by file name, rendered in memory: `{stem}.json`, `{stem}.md` and (with a
    depth task) `{stem}_needle.png`. The command writes them with workflows.outputs.save_files,
    which keeps them in a temporary folder if the output folder fails. On a torchrun rank other
    than 0: {} (rank 0 writes the one copy; the others need not draw the PNG)."""
    from ..distributed import is_main

    if not is_main():
        return {}
    doc: dict[str, Any] = result.to_dict()
    files: dict[str, str | bytes] = {
        f"{stem}.json": json.dumps(doc, indent=2, allow_nan=False) + "\n",
        f"{stem}.md": markdown(result),
    }
    png = heatmap_png(result)
    if png is not None:
        files[f"{stem}_needle.png"] = png
    return files
