"""`min_seq_len="auto"`: sparse or dense from a measured cost per shape, not a fixed length.

A fixed 16K was right for 32 query / 8 KV heads of dim 128, and wrong for few heads per GPU: at
9 / 3 heads, D 64 on an H200 PBS lost 6.3x to cuDNN at 8K and won 1.7x at 32K (issue 22), and
where it crosses over depends on the GPU, the heads, the head dim and the settings.

The first call in a length bucket (the next power of two of the key length) times both paths on
that call's own inputs, as they will run (eager or graph), and keeps the answer for the bucket:
in this process, and on CUDA also in a JSON file in pbs's cache folder (`_io.cache_dir`: off with
PBS_CACHE_DIR=off), keyed by the GPU's name and the torch and Triton versions. Sparse must beat dense by `MARGIN` to be chosen, so a timing's noise
cannot make a call slower than dense attention.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ._io import cache_dir, write_atomic

AUTO = "auto"
MARGIN = 0.95  # sparse is chosen when it takes at most 95% of dense's time
WARMUP, REPEATS = 2, 5  # warm-up covers JIT, autotuning and a graph capture under graph="auto"

_CHOICES: dict = {}  # key -> True when the sparse path wins
_FILE_LOADED: dict = {}  # path -> loaded


def length_bucket(n: int) -> int:
    """The power of two >= n: lengths whose choice is measured once."""
    return 1 << max(0, int(n) - 1).bit_length()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def choice_key(q: torch.Tensor, k: torch.Tensor, settings: tuple) -> tuple:
    """What the choice depends on: device, dtype, batch, heads, KV heads, head dim, the length's
    bucket, whether queries are a chunk (M < N) and the call's settings (a tuple of plain values)."""
    B, HQ, M, D = q.shape
    N = k.shape[2]
    return (_device_name(q.device), str(q.dtype), B, HQ, k.shape[1], D, length_bucket(N), M == N) + tuple(settings)


def cache_path() -> Path | None:
    """The crossover file for this torch and Triton, or None with caching off."""
    root = cache_dir()
    if root is None:
        return None
    import triton

    return root / f"crossover-torch{torch.__version__}-triton{triton.__version__}.json"


def _load(path: Path) -> None:
    if path in _FILE_LOADED:
        return
    _FILE_LOADED[path] = True
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no file yet, or one we cannot read: measure again
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and isinstance(row.get("key"), list) and isinstance(row.get("sparse"), bool):
            try:
                _CHOICES.setdefault(tuple(row["key"]), row["sparse"])
            except TypeError:  # a nested list (another version's key): not one of ours
                continue


_PLAIN = (str, int, float, bool, type(None))  # what a key holds that JSON writes and reads back as it was


def _save(path: Path) -> None:
    # A key with another value (a numpy int passed as a setting) stays in memory only: json.dumps
    # would raise on it, on CUDA alone (the CPU keeps no file).
    rows = [{"key": list(k), "sparse": v} for k, v in _CHOICES.items() if all(isinstance(x, _PLAIN) for x in k)]
    try:
        write_atomic(path, json.dumps(rows, indent=1))
    except OSError:
        pass  # a read-only cache folder only costs a measurement per process


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Median wall seconds of fn() (host and device), after WARMUP calls."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sparse_wins(key: tuple, run_sparse: Callable[[], object], run_dense: Callable[[], object],
                device: torch.device, *, timer: Callable | None = None, use_file: bool | None = None) -> bool:
    """Whether the sparse path is at least 1 / MARGIN times faster than dense for `key`,
    measured on the first call and then remembered (in the file too with `use_file`, by default
    on CUDA only: CPU timings are the tests' and the interpreter's, not a deployment's)."""
    if use_file is None:
        use_file = device.type == "cuda"
    path = cache_path() if use_file else None
    if path is not None:
        _load(path)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    timer = timer or time_call
    t_dense = timer(run_dense, device)
    t_sparse = timer(run_sparse, device)
    _CHOICES[key] = wins = t_sparse <= MARGIN * t_dense
    if path is not None:
        _save(path)
    return wins


def forget() -> None:
    """Drop the in-process choices: the next call of each shape measures again (the file is not
    read again in this process)."""
    _CHOICES.clear()
