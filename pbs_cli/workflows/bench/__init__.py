"""`pbs bench`'s workflow: time PBS attention against dense and sparse baselines, and check it.

settings.py   BenchSettings (the command's options as data), the CPU pass's length cap
results.py    results (plain data, torch-free), csv_rows
harness.py    tolerances, flops, the kernel check; Harness: timing, gates and speedups, once
baselines.py  the whole-prompt case's baselines, name -> registry entry (--baselines)
prompt.py     the whole-prompt case: dense baselines, PBS and its stages, sparse baselines
serving.py    the chunk and varlen cases, each with its dense rows' registry
flex.py       PBS's kept tiles as a FlexAttention BlockMask, and a call over them
workloads.py  synthetic and captured Q/K/V
e2e.py        time to first token, dense and with a profile
render.py     the report as files (JSON, CSV, Markdown, PNG bytes) and the table columns
workflow.py   run_bench: checks, the profile (read once), the cases in order

Importing this package stays torch-free (the command reads BASELINES for its option check);
run_bench loads the workflow on first call.
"""

from ..progress import ProgressFn, no_progress
from .baselines import BASELINES
from .results import CSV_COLUMNS, BenchReport, E2EResult, MethodResult, SeqLenResult, csv_rows
from .settings import BenchSettings, cpu_cap_note


def run_bench(settings: BenchSettings, progress: ProgressFn = no_progress) -> BenchReport:
    """Run the bench (see workflow.run_bench)."""
    from .workflow import run_bench as run

    return run(settings, progress=progress)


__all__ = ["BASELINES", "CSV_COLUMNS", "BenchReport", "BenchSettings", "E2EResult", "MethodResult",
           "SeqLenResult", "cpu_cap_note", "csv_rows", "run_bench"]
