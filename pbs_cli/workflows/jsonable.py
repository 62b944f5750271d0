"""Plain JSON data from workflow results (the `--format json` documents and report files)."""

from __future__ import annotations

import dataclasses
import math
import os
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Any, Mapping


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data from results: dataclasses, mappings, sequences, Paths, enums, scalars."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, date):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if callable(getattr(obj, "to_dict", None)):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if callable(getattr(obj, "tolist", None)):  # numpy arrays/scalars, torch tensors
        return to_jsonable(obj.tolist())
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
