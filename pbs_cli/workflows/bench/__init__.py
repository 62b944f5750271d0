"""`pbs bench`'s workflow: time PBS attention against dense and sparse baselines, and check it.

workflow.py   run_bench: per length, PBS and its stages, dense SDPA, FlexAttention, PBS unpermuted
results.py    settings and results (plain data, torch-free), csv_rows
flex.py       PBS's kept tiles as a FlexAttention BlockMask
e2e.py        time to first token, dense and with a profile

Importing this package stays torch-free (the command reads BASELINES for its option check);
run_bench loads the workflow on first call.
"""

from ..progress import ProgressFn, no_progress
from .results import BASELINES, CSV_COLUMNS, BenchReport, BenchSettings, E2EResult, MethodResult, SeqLenResult, csv_rows


def run_bench(settings: BenchSettings, progress: ProgressFn = no_progress) -> BenchReport:
    """Run the bench (see workflow.run_bench)."""
    from .workflow import run_bench as run

    return run(settings, progress=progress)


__all__ = ["BASELINES", "CSV_COLUMNS", "BenchReport", "BenchSettings", "E2EResult", "MethodResult",
           "SeqLenResult", "csv_rows", "run_bench"]
