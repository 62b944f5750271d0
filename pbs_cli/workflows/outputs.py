"""Output paths: checked before the work, written whole, never lost after the work.

    check_out_dir(Path("pbs-out/analyze"))        # OutputUnwritable before anything runs
    saved = save_files(out_dir, {"report.json": text, "density_grid.png": png})
    ...print the results...
    saved.raise_failure()                          # OutputWriteFailed, naming where they went

A write that fails after minutes of work (disk full, folder removed, permissions changed) must
not lose the results: `save_files` then writes all of them to a fresh folder in the system's
temporary directory and the error says where.

Under torchrun only rank 0 writes (workflows.distributed.is_main): every rank computes the same
results, and one copy of each file is what the user asked for.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from pbs_kernels._io import write_atomic

from .distributed import is_main
from .errors import OutputUnwritable, OutputWriteFailed

__all__ = ["Saved", "check_out_dir", "check_out_file", "save_file", "save_files"]


def _blocker(path: Path) -> str | None:
    """Why folders cannot be created down to `path` (which does not exist), or None."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to write in {parent}"
    return None


def check_out_dir(path: str | os.PathLike) -> Path:
    """OutputUnwritable unless `path` is (or can be created as) a folder this process can write."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputUnwritable(path, "folder", f"{path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputUnwritable(path, "folder", f"no permission to write in {path}")
        return path
    reason = _blocker(path)
    if reason is not None:
        raise OutputUnwritable(path, "folder", reason)
    return path


def check_out_file(path: str | os.PathLike) -> Path:
    """OutputUnwritable unless `path` is (or can be created as) a file this process can write."""
    path = Path(path)
    if path.is_dir():
        raise OutputUnwritable(path, "file", f"{path} is a folder; name a file in it")
    if path.exists():
        if not os.access(path.parent, os.W_OK | os.X_OK):  # replaced via a temp file beside it
            raise OutputUnwritable(path, "file", f"no permission to write in {path.parent}")
        return path
    reason = _blocker(path)
    if reason is not None:
        raise OutputUnwritable(path, "file", reason)
    return path


@dataclass
class Saved:
    """Where `save_files` put the files; `failure` is set when they are not where asked."""

    paths: list[Path] = field(default_factory=list)
    failure: OutputWriteFailed | None = None

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


def save_files(folder: str | os.PathLike, files: Mapping[str, str | bytes], *, label: str = "pbs") -> Saved:
    """Write `files` (name -> content) into `folder`, each atomically (whole or not at all). If a
    write fails, every file goes to a new folder under the temporary directory instead and the
    returned `failure` says so (files already written in `folder` are whole and stay). On a
    torchrun rank other than 0 nothing is written (an empty Saved)."""
    folder = Path(folder)
    saved = Saved()
    if not is_main():
        return saved
    for name, data in files.items():
        try:
            saved.paths.append(write_atomic(folder / name, data))
        except OSError as e:
            reason = e.strerror or type(e).__name__
            failed = folder / name
            break
    else:
        return saved
    try:
        fallback = Path(tempfile.mkdtemp(prefix=f"{label}-"))
        saved.paths = [write_atomic(fallback / name, data) for name, data in files.items()]
    except OSError:
        saved.paths, fallback = [], None
    saved.failure = OutputWriteFailed(failed, reason, fallback)
    return saved


def save_file(path: str | os.PathLike, data: str | bytes, *, label: str = "pbs") -> Saved:
    """`save_files` for one file at `path` (the fallback keeps its name)."""
    path = Path(path)
    return save_files(path.parent, {path.name: data}, label=label)
