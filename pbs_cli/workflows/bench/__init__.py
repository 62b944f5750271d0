"""`pbs bench`'s workflow: time PBS attention against dense and sparse baselines, and check it."""

from .workflow import (
    BASELINES,
    CSV_COLUMNS,
    BenchReport,
    BenchSettings,
    E2EResult,
    MethodResult,
    SeqLenResult,
    csv_rows,
    run_bench,
)

__all__ = ["BASELINES", "CSV_COLUMNS", "BenchReport", "BenchSettings", "E2EResult", "MethodResult",
           "SeqLenResult", "csv_rows", "run_bench"]
