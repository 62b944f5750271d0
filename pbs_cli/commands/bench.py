"""`pbs bench`: time PBS attention against dense SDPA, FlexAttention and PBS without permutation,
check its output in the same run, and optionally time a model's first token with a profile.

The work is in `pbs_cli.workflows.bench` (returns plain results); this module parses options, prints and
writes files. torch, triton and matplotlib are imported inside functions.
"""

from __future__ import annotations

import csv
import io
import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from pbs_kernels.limits import HEAD_DIMS

from ..workflows.errors import PbsError, ProfileFileError
from ._options import (DeviceOpt, DtypeOpt, FormatOpt, Lengths, ProfileOpt, SeqLensOpt, parse_length, parse_lengths,
                       split_items)
from ..workflows.bench.results import BASELINES as _BASELINES
from ..workflows.lengths import format_length
from ..workflows.outputs import save_files
from ._output import Output, to_jsonable

if TYPE_CHECKING:
    from ..workflows.bench import BenchReport

DEFAULT_OUT = Path("pbs-out") / "bench"


class WorkloadKind(str, Enum):
    synthetic = "synthetic"
    vertical = "vertical"
    captured = "captured"


def parse_baselines(s: str) -> str:
    """'cudnn,flex' -> 'cudnn,flex' (checked, order kept); 'none' or '' -> ''."""
    text = str(s).strip().lower()
    if text in ("", "none"):
        return ""
    names = split_items(text, "cudnn,flex")
    bad = [n for n in names if n not in _BASELINES]
    if bad:
        raise typer.BadParameter(f"unknown baseline(s) {', '.join(bad)}; use a comma-separated subset of "
                                 f"{','.join(_BASELINES)}, or none")
    return ",".join(dict.fromkeys(names))


def parse_batch_lengths(s: str) -> Lengths:
    """'4k,4k,16k' -> [4096, 4096, 16384]: a batch, so repeated lengths stay."""
    items = s if isinstance(s, (list, tuple)) else split_items(s, "4k,16k")
    if not items:
        raise typer.BadParameter(f"{s!r} is not a list of lengths; use comma-separated lengths such as 4k,16k")
    return Lengths(parse_length(p) for p in items)


def _check_head_dim(value: int) -> int:
    if value not in HEAD_DIMS:
        raise typer.BadParameter(f"{value} is not supported; use one of {', '.join(map(str, HEAD_DIMS))}")
    return value


def command(
    seq_len: SeqLensOpt = "128k",
    profile: ProfileOpt = None,
    heads: Annotated[int, typer.Option("--heads", min=1, help="Query heads (synthetic workload).")] = 32,
    kv_heads: Annotated[int, typer.Option("--kv-heads", min=1, help="Key/value heads; divides --heads.")] = 8,
    head_dim: Annotated[int, typer.Option("--head-dim", callback=_check_head_dim, help="Head dimension: 64, 80, 96, 128 or 256.")] = 128,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size.")] = 1,
    dtype: DtypeOpt = "auto",
    workload: Annotated[WorkloadKind, typer.Option("--workload", case_sensitive=False, help="synthetic: seeded Q/K/V with sink, local, needle and slash heads; vertical: the vertical-slash pattern (scattered keys every query needs, a recency window, slash lines); captured: one layer of --model.")] = "synthetic",
    model: Annotated[Optional[str], typer.Option("--model", metavar="MODEL", help="Model id or folder for --workload captured and --e2e.", show_default="the embedded demo model")] = None,
    layer: Annotated[Optional[int], typer.Option("--layer", min=0, help="Layer to capture, and the profile layer whose settings are benched.", show_default="0")] = None,
    e2e: Annotated[bool, typer.Option("--e2e", help="Also time the model's first token with and without the profile.")] = False,
    baselines: Annotated[str, typer.Option("--baselines", parser=parse_baselines, metavar="NAMES", help="Comma-separated: cudnn,flash,efficient,flex,noperm (or none).")] = ",".join(_BASELINES),
    max_error: Annotated[Optional[float], typer.Option("--max-error", min=0.0, help="Output error vs dense above which PBS rows are FAILED.", show_default="0.05; 0.02 at threshold 1.0")] = None,
    format: FormatOpt = "table",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Folder for results.json, results.csv, results.md and time_vs_seq_len.png.", show_default=str(DEFAULT_OUT))] = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic workload.")] = 0,
    chunk: Annotated[Optional[Lengths], typer.Option("--chunk", parser=parse_lengths, metavar="LENS", help="Chunked-prefill rows: the last chunk of each --seq-len against its cache, e.g. 8k,16k.")] = None,
    lengths: Annotated[Optional[Lengths], typer.Option("--lengths", parser=parse_batch_lengths, metavar="LENS", help="A packed varlen batch of these sequence lengths, e.g. 1k,4k,16k,64k.")] = None,
    serving_only: Annotated[bool, typer.Option("--serving-only", help="Only the --chunk and --lengths rows.")] = False,
) -> None:
    """Time PBS attention against dense attention at one or more prompt lengths, and check it.

    Per length: PBS (permute + select + attend, and each part), dense SDPA on each backend,
    FlexAttention on the same tiles, PBS without permutation, and below the profile's min_seq_len
    "pbs-auto" (the dense fallback a model runs there): ms, TFLOP/s, density, recall,
    error vs dense and speedup vs the fastest dense backend. A row whose output is wrong is
    FAILED and gets no speedup (exit 1). Writes JSON, CSV, Markdown and a plot to --out.
    Needs a CUDA GPU; --device cpu runs a correctness-only pass on small sizes.

    Serving rows: --chunk times the last chunk of each prompt against its cached prefix, and
    --lengths one packed batch of mixed lengths, each against dense SDPA / varlen attention.

    Under torchrun (torchrun --nproc_per_node N -m pbs_cli bench --e2e ...) the model is sharded
    over the processes and only its time to first token is measured, the slowest rank's; rank 0
    prints and writes (docs/tensor_parallel.md).

    Example: pbs bench --seq-len 8k,32k,128k --profile profiles/default.yaml
    Example: pbs bench --seq-len 128k --chunk 8k,16k --lengths 2k,8k,32k,64k --serving-only
    """
    from ..workflows.bench import BenchSettings, run_bench
    from ..workflows.bench.workflow import cpu_cap_note
    from ..workflows.outputs import check_out_dir

    out_dir = check_out_dir(Path(out) if out is not None else DEFAULT_OUT)  # before the bench runs
    o = Output(format)
    settings = BenchSettings(
        seq_lens=list(seq_len),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        batch=batch,
        dtype=getattr(dtype, "value", dtype),
        device=getattr(device, "value", device),
        workload=getattr(workload, "value", workload),
        model=model,
        layer=layer,
        profile=str(profile) if profile is not None else None,
        baselines=tuple(b for b in baselines.split(",") if b),
        seed=seed,
        max_error=max_error,
        e2e=e2e,
        chunks=list(chunk or []),
        lengths=list(lengths or []),
        prompt_rows=not serving_only,
    )
    cap = cpu_cap_note(settings.seq_lens) if settings.device == "cpu" else None
    if cap is not None:
        o.warn(cap)  # before the run, not only among the notes at the end
    try:
        with o.progress() as report_progress:
            report = run_bench(settings, progress=report_progress)
    except Exception as e:  # a broken profile file: one line, exit 1
        from pbs_kernels.profile import ProfileError

        if isinstance(e, ProfileError):
            raise ProfileFileError(str(e)) from e
        raise

    saved = save_files(out_dir, output_files(report), label="pbs-bench")
    document = report_document(report)
    if o.json:
        o.emit_json(document)
    else:
        print_report(o, report, skip_notes=(cap,) if cap else ())
    if saved.paths:
        o.info("wrote " + ", ".join(str(f) for f in saved.paths))
    saved.raise_failure()
    if report.failed:
        raise PbsError(f"{len(report.failed)} result(s) FAILED the correctness check ({', '.join(report.failed)}); "
                       f"see the notes in {out_dir / 'results.json'}")


# ---------------------------------------------------------------------------------------------
# Output.


def report_document(report: BenchReport) -> dict:
    doc = to_jsonable(report)
    doc["failed"] = report.failed
    doc["ok"] = not report.failed
    return doc


def csv_text(report: BenchReport) -> str:
    from ..workflows.bench import CSV_COLUMNS, csv_rows

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


def write_outputs(report: BenchReport, out_dir: Path) -> list[Path]:
    """`output_files` written into `out_dir`, each atomically; returns the paths."""
    saved = save_files(out_dir, output_files(report), label="pbs-bench")
    saved.raise_failure()
    return saved.paths


def plot_png(report: BenchReport) -> Optional[bytes]:
    """Time vs sequence length per method, log-log; None when nothing was timed."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in report.results:
        for m in r.methods:
            if m.ms is not None and m.ms > 0 and m.status != "FAILED":
                series.setdefault(m.method, []).append((r.seq_len, m.ms))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts))
        part = "." in name  # pbs.attend, flex.attend...: dashed
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
_COLUMNS = (
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


_E2E_HEADERS = ("seq len", "dense ms", "pbs ms", "speedup", "logits err", "same token")


def _e2e_cells(e) -> list[str]:
    same = "-" if e.same_token is None else ("yes" if e.same_token else "no")
    return [format_length(e.seq_len), _fmt(e.ttft_dense_ms, ".1f"), _fmt(e.ttft_pbs_ms, ".1f"),
            _fmt(e.speedup, ".2f"), _fmt(e.logits_error, ".1e"), same]


def _cells(m) -> list[str]:
    out = []
    for _, name, spec in _COLUMNS:
        value = getattr(m, name)
        out.append(str(value) if spec is None else _fmt(value, spec))
    return out


def _header_line(report: BenchReport) -> str:
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


def _config_line(report: BenchReport) -> str:
    cfg = report.pbs
    return (f"PBS block {cfg.block_size}, segment {cfg.segment_size}, threshold {cfg.threshold:g}, "
            f"permute {'on' if cfg.permute else 'off'}, estimator {cfg.estimator}, threshold over "
            f"{cfg.threshold_mass} mass, vertical keys {cfg.vertical_keys} ({cfg.source}); "
            f"workload {report.workload}")


def _title(r) -> str:
    fastest = f"{r.fastest_dense} {r.fastest_dense_ms:.3f} ms" if r.fastest_dense_ms is not None else "-"
    case = f"{r.case}: " if getattr(r, "case", None) else ""
    return (f"{case}{format_length(r.seq_len)} tokens (B={r.batch} HQ={r.heads} H={r.kv_heads} D={r.head_dim}), "
            f"reference {r.reference}, fastest dense {fastest}")


def print_report(o: Output, report: BenchReport, *, skip_notes: tuple[str, ...] = ()) -> None:
    """Rich tables on stderr, at the console's width: a table too wide for it continues in a
    second table keyed by the method name (Output.table), so every number stays whole."""
    from rich import box

    o.info("pbs bench: " + _header_line(report))
    o.info(_config_line(report))
    for r in report.results:
        # Columns nothing filled (ms, TFLOP/s, speedup on the CPU pass) are left out: with them the
        # CPU table took 98 columns. results.md keeps every column.
        shown = [i for i, (_, name, _) in enumerate(_COLUMNS) if any(getattr(m, name) is not None for m in r.methods)]
        styles = ["bold red" if m.status == "FAILED" else ("dim" if m.status in ("unavailable", "skipped") else "")
                  for m in r.methods]
        o.table(_title(r), [_COLUMNS[i][0] for i in shown],
                [[c for i, c in enumerate(_cells(m)) if i in shown] for m in r.methods], box=box.SIMPLE_HEAD,
                row_styles=styles, justify=["left" if _COLUMNS[i][2] is None else "right" for i in shown])
        for m in r.methods:
            if m.note and m.status in ("FAILED", "unavailable", "skipped"):
                o.info(f"  {m.method}: {m.note}")
    if report.e2e:
        o.table("time to first token", list(_E2E_HEADERS), [_e2e_cells(e) for e in report.e2e], box=box.SIMPLE_HEAD,
                justify=["right"] * len(_E2E_HEADERS))
    for note in report.notes:
        if note not in skip_notes:
            o.info(f"note: {note}")


def markdown(report: BenchReport) -> str:
    """The results as Markdown tables (ready for BENCHMARKS.md)."""
    lines = [f"pbs bench: {_header_line(report)}", "", _config_line(report), ""]
    for r in report.results:
        lines += [f"**{_title(r)}**", "", "| " + " | ".join(h for h, _, _ in _COLUMNS) + " |",
                  "|" + "|".join("---" if spec is None else "---:" for _, _, spec in _COLUMNS) + "|"]
        lines += ["| " + " | ".join(_cells(m)) + " |" for m in r.methods]
        notes = [f"- {m.method}: {m.note}" for m in r.methods if m.note]
        lines += [""] + notes + ([""] if notes else [])
    if report.e2e:
        lines += ["**time to first token**", "", "| " + " | ".join(_E2E_HEADERS) + " |",
                  "|" + "---:|" * len(_E2E_HEADERS)]
        lines += ["| " + " | ".join(_e2e_cells(e)) + " |" for e in report.e2e]
        lines.append("")
    lines += [f"- note: {n}" for n in report.notes]
    return "\n".join(lines).rstrip() + "\n"
