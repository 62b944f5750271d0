"""Running `pbs` in-process as a user would, for the CLI tests that check what a user sees."""
from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from pbs_cli.app import main


def run_pbs(args, capsys, monkeypatch, columns: int | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `pbs ARGS`, at a terminal `columns` wide when given; an
    exception escaping main is a traceback the user would see, so the test fails with it."""
    monkeypatch.delenv("PBS_DEBUG", raising=False)
    if columns is not None:
        monkeypatch.setenv("COLUMNS", str(columns))
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report it as what the user would see
        out, err = capsys.readouterr()
        pytest.fail(f"a traceback reached the user of `pbs {' '.join(map(str, args))}`:\n{err[-1500:]}\n"
                    f"{traceback.format_exc()[-3000:]}")
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> set[str]:
    """Every path below `folder`, relative to it (what a command left behind)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}
