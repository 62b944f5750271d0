"""`pbs bench`: time PBS attention against dense SDPA, FlexAttention and PBS without permutation,
check its output in the same run, and optionally time a model's first token with a profile.

The work is in `pbs_cli.workflows.bench` (returns plain results, rendered as files by its
render.py); this module parses options, prints and saves the files. The workflow package is
torch-free at import: torch, triton and matplotlib load when the bench runs.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from pbs_kernels.limits import HEAD_DIMS
from rich import box

from ..workflows.bench import BASELINES as _BASELINES
from ..workflows.bench import BenchReport, BenchSettings, cpu_cap_note, run_bench
from ..workflows.bench.results import FAILED, SKIPPED, UNAVAILABLE
from ..workflows.bench.render import (COLUMNS, E2E_HEADERS, cells, config_line, e2e_cells, header_line, output_files,
                                      report_document, title)
from ..workflows.errors import PbsError
from ..workflows.outputs import check_out_dir, save_files
from ._options import (DeviceOpt, DtypeOpt, FormatOpt, Lengths, ProfileOpt, SeqLensOpt, parse_length, parse_lengths,
                       split_items)
from ._output import Output

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
    baselines: Annotated[str, typer.Option("--baselines", parser=parse_baselines, metavar="NAMES", help=f"Comma-separated: {','.join(_BASELINES)} (or none).")] = ",".join(_BASELINES),
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
    with o.progress() as report_progress:
        report = run_bench(settings, progress=report_progress)

    saved = save_files(out_dir, output_files(report), label="pbs-bench")
    if o.json:
        o.emit_json(report_document(report))
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


def write_outputs(report: BenchReport, out_dir: Path) -> list[Path]:
    """`output_files` written into `out_dir`, each atomically; returns the paths."""
    saved = save_files(out_dir, output_files(report), label="pbs-bench")
    saved.raise_failure()
    return saved.paths


def print_report(o: Output, report: BenchReport, *, skip_notes: tuple[str, ...] = ()) -> None:
    """Rich tables on stderr, at the console's width: a table too wide for it continues in a
    second table keyed by the method name (Output.table), so every number stays whole."""
    o.info("pbs bench: " + header_line(report))
    o.info(config_line(report))
    for r in report.results:
        # Columns nothing filled (ms, TFLOP/s, speedup on the CPU pass) are left out: with them the
        # CPU table took 98 columns. results.md keeps every column.
        shown = [i for i, (_, name, _) in enumerate(COLUMNS) if any(getattr(m, name) is not None for m in r.methods)]
        styles = ["bold red" if m.status == FAILED else ("dim" if m.status in (UNAVAILABLE, SKIPPED) else "")
                  for m in r.methods]
        o.table(title(r), [COLUMNS[i][0] for i in shown],
                [[c for i, c in enumerate(cells(m)) if i in shown] for m in r.methods], box=box.SIMPLE_HEAD,
                row_styles=styles, justify=["left" if COLUMNS[i][2] is None else "right" for i in shown])
        for m in r.methods:
            if m.note and m.status in (FAILED, UNAVAILABLE, SKIPPED):
                o.info(f"  {m.method}: {m.note}")
    if report.e2e:
        o.table("time to first token", list(E2E_HEADERS), [e2e_cells(e) for e in report.e2e], box=box.SIMPLE_HEAD,
                justify=["right"] * len(E2E_HEADERS))
    for note in report.notes:
        if note not in skip_notes:
            o.info(f"note: {note}")
