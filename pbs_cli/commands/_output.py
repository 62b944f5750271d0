"""The one output object commands print through.

Human output (messages, tables, progress bars) goes to stderr; `--format json` prints exactly one
JSON document on stdout, so `pbs ... --format json | jq` always works. Workflows never print:
they take a plain progress callback (`ProgressFn`) and return data.

Under torchrun only rank 0 prints (workflows.distributed.is_main): the other ranks' Output says
nothing, so a tensor-parallel run shows one set of tables and one JSON document.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Sequence

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

        Every value stays whole: headers and text cells may wrap at spaces, no word or number is
        ever cut (rich's own shrinking gives '0.40…' or crops the last column). A table that
        cannot fit the console so is printed as several tables, each with the first `keys`
        columns (the row's name) and as many others as fit.
        """
        if self.json:
            return
        rows = [[_cell(v) for v in r] for r in rows]
        numeric = [bool(rows) and all(v == "-" or _NUMBER.fullmatch(v) for v in (r[i] for r in rows))
                   for i in range(len(columns))]
        sides = list(justify) if justify is not None else ["right" if n else "left" for n in numeric]
        columns = [str(c) for c in columns]
        kept = list(range(min(keys, len(columns))))
        parts: list[list[int]] = []
        part = list(kept)
        for i in range(len(kept), len(columns)):
            if len(part) > len(kept) and self._layout(columns, rows, [*part, i], box) is None:
                parts.append(part)
                part = [*kept, i]
            else:
                part.append(i)
        parts.append(part)
        for n, cols in enumerate(parts):
            # The title on its own line: as the table's title rich would wrap it to the table's width.
            self.console.print(Text(title if n == 0 else "(continued)", style="bold"))
            widths = self._layout(columns, rows, cols, box)  # None: the key columns alone are too wide
            table = self._rich_table(columns, rows, cols, box, widths, [sides[i] for i in cols])
            for j, r in enumerate(rows):
                # Text, not str: a value like "[dense]" must not be read as rich markup.
                table.add_row(*(Text(r[i]) for i in cols), style=row_styles[j] if row_styles is not None else None)
            self.console.print(table, crop=False)

    def _rich_table(self, columns, rows, cols, box, widths, sides) -> Table:
        from rich import box as boxes

        table = Table(box=box if box is not None else boxes.HEAVY_HEAD)
        for k, i in enumerate(cols):
            table.add_column(columns[i], justify=sides[k] if sides else "left", overflow="fold",
                             width=widths[k] if widths else None)
        return table

    def _layout(self, columns, rows, cols, box) -> Optional[list[int]]:
        """Column widths that fit the console with no word or number cut, or None. Starts from
        each column's natural width and narrows the column with the most room above its longest
        word, one character at a time."""
        natural = [max([len(columns[i])] + [len(r[i]) for r in rows]) for i in cols]
        least = [max(_longest_word(columns[i]), *(_longest_word(r[i]) for r in rows)) for i in cols]
        frame = self._frame(columns, cols, box)
        budget = self.console.width - frame
        if sum(least) > budget:
            return None
        widths = list(natural)
        while sum(widths) > budget:
            k = max(range(len(widths)), key=lambda k: widths[k] - least[k])
            widths[k] -= 1
        return widths

    def _frame(self, columns, cols, box) -> int:
        """Columns the borders and padding of a table take: drawn with one-character columns."""
        import io

        table = self._rich_table(columns, [], cols, box, [1] * len(cols), None)
        table.add_row(*(["x"] * len(cols)))
        sink = Console(file=io.StringIO(), width=10**4, legacy_windows=False)
        with sink.capture() as drawn:
            sink.print(table)
        return max(len(line) for line in drawn.get().splitlines()) - len(cols)

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


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?%?x?")


def _longest_word(text: str) -> int:
    return max((len(w) for w in text.split()), default=1)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
