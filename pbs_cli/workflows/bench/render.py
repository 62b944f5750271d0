"""`pbs bench`'s report rendered as files, by name: the JSON document, results.csv, results.md and
the time-vs-length plot (PNG bytes), for `outputs.save_files`; and the table columns, titles and
header lines the command's console tables share with results.md.

    files = output_files(report)      # {"results.json": str, ..., "time_vs_seq_len.png": bytes}

torch-free; matplotlib is imported inside plot_png (only a timed run has a plot).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Optional

from ..jsonable import to_jsonable
from ..lengths import format_length
from .results import CSV_COLUMNS, FAILED, BenchReport, csv_rows, is_part


def report_document(report: BenchReport) -> dict:
    doc = to_jsonable(report)
    doc["failed"] = report.failed
    doc["ok"] = not report.failed
    return doc


def csv_text(report: BenchReport) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(report):
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def output_files(report: BenchReport) -> dict[str, str | bytes]:
    """results.json, results.csv, results.md and (with timings) time_vs_seq_len.png by name."""
    files: dict[str, str | bytes] = {
        "results.json": json.dumps(report_document(report), indent=2, allow_nan=False) + "\n",
        "results.csv": csv_text(report),
        "results.md": markdown(report),
    }
    png = plot_png(report)
    if png is not None:
        files["time_vs_seq_len.png"] = png
    return files


def plot_png(report: BenchReport) -> Optional[bytes]:
    """Time vs sequence length per method, log-log; None when nothing was timed."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in report.results:
        for m in r.methods:
            if m.ms is not None and m.ms > 0 and m.status != FAILED:
                series.setdefault(m.method, []).append((r.seq_len, m.ms))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts))
        part = is_part(name)  # pbs.attend, flex.attend...: dashed
        ax.plot(xs, ys, marker="o", linestyle="--" if part else "-", linewidth=1.2 if part else 2.0, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("time (ms, median)")
    lens = sorted({r.seq_len for r in report.results})
    ax.set_xticks(lens, [format_length(n) for n in lens])
    ax.set_title(f"causal attention forward, {report.env.device}, {report.env.dtype}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(float(x), spec)


# (header, MethodResult field, format): one list for the console table and results.md.
COLUMNS = (
    ("method", "method", None),
    ("status", "status", None),
    ("ms", "ms", ".3f"),
    ("TFLOP/s", "tflops", ".1f"),
    ("density", "density", ".4f"),
    ("recall", "recall", ".4f"),
    ("error", "error", ".2e"),
    ("kernel err", "kernel_error", ".1e"),
    ("speedup", "speedup", ".2f"),
    ("sel. eff.", "selection_efficiency", ".3f"),
)


E2E_HEADERS = ("seq len", "dense ms", "pbs ms", "speedup", "logits err", "same token")


def e2e_cells(e) -> list[str]:
    same = "-" if e.same_token is None else ("yes" if e.same_token else "no")
    return [format_length(e.seq_len), _fmt(e.ttft_dense_ms, ".1f"), _fmt(e.ttft_pbs_ms, ".1f"),
            _fmt(e.speedup, ".2f"), _fmt(e.logits_error, ".1e"), same]


def cells(m) -> list[str]:
    out = []
    for _, name, spec in COLUMNS:
        value = getattr(m, name)
        out.append(str(value) if spec is None else _fmt(value, spec))
    return out


def header_line(report: BenchReport) -> str:
    env = report.env
    parts = [f"device {env.device}"]
    if env.cuda:
        parts.append(f"CUDA {env.cuda}")
    if env.cudnn:
        parts.append(f"cuDNN {env.cudnn}")
    parts += [f"torch {env.torch}", f"triton {env.triton or '-'}", f"dtype {env.dtype}", f"timing: {env.timing}"]
    if env.ranks > 1:
        parts.append(f"tensor parallel over {env.ranks} processes")
    return " | ".join(parts)


def config_line(report: BenchReport) -> str:
    cfg = report.pbs.layer
    return (f"PBS block {cfg.block_size}, segment {cfg.segment_size}, threshold {cfg.threshold:g}, "
            f"permute {'on' if cfg.permute else 'off'}, estimator {cfg.estimator}, threshold over "
            f"{cfg.threshold_mass} mass, vertical keys {cfg.vertical_keys} ({report.pbs.source}); "
            f"workload {report.workload}")


def title(r) -> str:
    fastest = f"{r.fastest_dense} {r.fastest_dense_ms:.3f} ms" if r.fastest_dense_ms is not None else "-"
    case = f"{r.case}: " if getattr(r, "case", None) else ""
    return (f"{case}{format_length(r.seq_len)} tokens (B={r.batch} HQ={r.heads} H={r.kv_heads} D={r.head_dim}), "
            f"reference {r.reference}, fastest dense {fastest}")


def markdown(report: BenchReport) -> str:
    """The results as Markdown tables (ready for BENCHMARKS.md)."""
    lines = [f"pbs bench: {header_line(report)}", "", config_line(report), ""]
    for r in report.results:
        lines += [f"**{title(r)}**", "", "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
                  "|" + "|".join("---" if spec is None else "---:" for _, _, spec in COLUMNS) + "|"]
        lines += ["| " + " | ".join(cells(m)) + " |" for m in r.methods]
        notes = [f"- {m.method}: {m.note}" for m in r.methods if m.note]
        lines += [""] + notes + ([""] if notes else [])
    if report.e2e:
        lines += ["**time to first token**", "", "| " + " | ".join(E2E_HEADERS) + " |",
                  "|" + "---:|" * len(E2E_HEADERS)]
        lines += ["| " + " | ".join(e2e_cells(e)) + " |" for e in report.e2e]
        lines.append("")
    lines += [f"- note: {n}" for n in report.notes]
    return "\n".join(lines).rstrip() + "\n"
