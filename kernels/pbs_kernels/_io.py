"""Atomic file writes, shared by the runtime (profiles) and the toolkit (reports), and the one
cache folder both use (measured crossovers, dequantized GGUF models)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write a file whole or not at all: temp file in the same folder, fsync, os.replace.
    Creates missing parent folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600 files; keep an existing file's mode, else the usual 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def cache_dir() -> Path | None:
    """Where pbs keeps what it can recompute: $PBS_CACHE_DIR, else $XDG_CACHE_HOME/pbs, else
    ~/.cache/pbs; PBS_CACHE_DIR=off (or none, 0, false, no, an empty value) turns caching off."""
    value = os.environ.get("PBS_CACHE_DIR")
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false", "no") else Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pbs"
