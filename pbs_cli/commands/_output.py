"""The one output object commands print through.

Human output (messages, tables, progress bars) goes to stderr; `--format json` prints exactly one
JSON document on stdout, so `pbs ... --format json | jq` always works. Workflows never print:
they take a plain progress callback (`ProgressFn`) and return data.

Under torchrun only rank 0 prints (workflows.distributed.is_main): the other ranks' Output says
nothing, so a tensor-parallel run shows one set of tables and one JSON document.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Sequence

from pbs_kernels._io import write_atomic  # noqa: F401  (re-exported for commands)
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..workflows.distributed import is_main
from ..workflows.jsonable import to_jsonable  # noqa: F401  (re-exported for commands)
from ..workflows.progress import ProgressFn, no_progress  # noqa: F401


class Output:
    """`Output("table")` or `Output("json")`; `fmt` may also be the FormatOpt enum."""

    def __init__(self, fmt: str = "table") -> None:
        fmt = getattr(fmt, "value", fmt)
        if fmt not in ("table", "json"):
            raise ValueError(f"unknown output format {fmt!r}; expected table or json")
        self.fmt: str = fmt
        # stderr=True resolves sys.stderr at each write, so CliRunner's capture sees it.
        self.console = Console(stderr=True, highlight=False, soft_wrap=False, quiet=not is_main())
        self.silent = not is_main()
        self._json_emitted = False

    @property
    def json(self) -> bool:
        return self.fmt == "json"

    # -- human output (stderr) -----------------------------------------------------------

    def info(self, message: str) -> None:
        """A plain line on stderr, in both formats (no rich markup interpretation)."""
        self.console.print(message, markup=False)

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {message}", markup=False, style="yellow")

    def table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
              box: Any = None, row_styles: Optional[Sequence[str]] = None,
              justify: Optional[Sequence[str]] = None, keys: int = 1) -> None:
        """A rich table on stderr. Skipped with --format json, whose document carries the data.

        Every cell stays whole: headers may wrap at spaces, values never wrap or get cut. A table
        wider than the console is printed as several tables, each with the first `keys` columns
        (the row's name) and as many others as fit; rich would otherwise cut numbers to '0.40…'.
        """
        if self.json:
            return
        rows = [list(r) for r in rows]
        columns = list(columns)
        kept = list(range(min(keys, len(columns))))
        parts: list[list[int]] = []
        part = list(kept)
        for i in range(len(kept), len(columns)):
            if len(part) > len(kept) and not self._fits(columns, rows, [*part, i], box):
                parts.append(part)
                part = [*kept, i]
            else:
                part.append(i)
        parts.append(part)
        for n, cols in enumerate(parts):
            # The title on its own line: as the table's title rich would wrap it to the table's width.
            self.console.print(Text(title if n == 0 else "(continued)", style="bold"))
            # Narrower than its natural width, each column gets exactly its widest value (or header
            # word): rich's own shrinking can leave the table a few columns too wide, then cropped.
            tight = self._width(self._rich_table(columns, rows, cols, box, None, None), False) > self.console.width
            self.console.print(self._rich_table(columns, rows, cols, box, row_styles, justify, tight))

    def _rich_table(self, columns, rows, cols, box, row_styles, justify=None, tight=False) -> Table:
        from rich import box as boxes

        table = Table(box=box if box is not None else boxes.HEAVY_HEAD)
        for i in cols:
            numeric = bool(rows) and all(_is_number(r[i]) or r[i] is None for r in rows)
            # min_width: the widest value, so rich narrows only the header (which wraps at spaces).
            widest = max((len(_cell(r[i])) for r in rows), default=1)
            side = justify[i] if justify is not None else ("right" if numeric else "left")
            word = max((len(w) for w in str(columns[i]).split()), default=1)
            table.add_column(columns[i], justify=side, no_wrap=False, min_width=widest, overflow="fold",
                             width=max(widest, word) if tight else None)
        for j, r in enumerate(rows):
            # Text, not str: a value like "[dense]" must not be read as rich markup.
            table.add_row(*(Text(_cell(r[i])) for i in cols),
                          style=row_styles[j] if row_styles is not None else None)
        return table

    def _fits(self, columns, rows, cols, box) -> bool:
        """Whether these columns fit the console with every value and header word whole."""
        table = self._rich_table(columns, rows, cols, box, None, None)
        return self._width(table, True) <= self.console.width

    def _width(self, table: Table, minimum: bool) -> int:
        from rich.measure import Measurement

        m = Measurement.get(self.console, self.console.options.update(max_width=10**6), table)
        return m.minimum if minimum else m.maximum

    @contextmanager
    def progress(self) -> Iterator[ProgressFn]:
        """Yield a `ProgressFn` that drives rich progress bars on stderr.

        with out.progress() as report:
            run_workflow(..., progress=report)   # report("layers", 3, 32)
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self.silent:
            yield no_progress
            return
        if not self.console.is_terminal:
            # Logs and captured output: no redraws, one line per finished step instead.
            yield self._plain_progress()
            return
        bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        tasks: dict[str, Any] = {}

        def report(desc: str, completed: int, total: Optional[int] = None) -> None:
            if desc not in tasks:
                tasks[desc] = bars.add_task(desc, total=total)
            bars.update(tasks[desc], completed=completed, total=total)

        with bars:
            yield report

    def _plain_progress(self) -> ProgressFn:
        done: set[str] = set()

        def report(desc: str, completed: int, total: Optional[int] = None) -> None:
            if total is not None and completed >= total and desc not in done:
                done.add(desc)
                self.info(f"{desc}: {completed}/{total} done")

        return report

    # -- machine output (stdout) ---------------------------------------------------------

    def emit_json(self, obj: Any) -> None:
        """Print `obj` as the command's one JSON document on stdout (dataclasses, Paths, enums,
        numpy/torch scalars are converted; NaN/inf become null, which strict JSON requires)."""
        if self._json_emitted:
            raise RuntimeError("emit_json called twice; a command prints one JSON document")
        self._json_emitted = True
        if self.silent:
            return
        sys.stdout.write(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
