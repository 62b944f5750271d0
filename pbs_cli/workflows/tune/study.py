"""Optuna side of `pbs tune`: storage, one resumable study per layer, search space, seeds.

* Storage: a SQLite file by default; `--storage` takes any SQLAlchemy URL (postgresql://,
  mysql://, sqlite:///) or a journal file (`journal:PATH` or a path ending in .log/.journal),
  so several processes or machines can fill the same studies.
* Studies are named `<study>-layer<i>` and opened with `load_if_exists=True`: rerunning the same
  command after a kill finds the completed trials and runs only the missing ones. Each study
  records what its numbers mean (sequence length, calibration text, cost model, search space);
  opening it for something else is an error instead of a silent mix.
* Two objectives, both minimised: output error and cost (time / dense time). Feasibility goes
  through `trial.set_constraint` (Optuna 5; the samplers' `constraints_func` is deprecated):
  a setting slower than dense attention, or one that wrecks the layer, is infeasible.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pbs_kernels.limits import BLOCK_SIZES

from ..errors import (PbsError, SeqLenTooShort, StorageDriverMissing, StorageInvalid, StorageUnwritable,
                      StudyMismatchError)

if TYPE_CHECKING:
    import optuna
    from pbs_kernels.analysis import LayerAnalysis
    from pbs_kernels.profile import LayerConfig

__all__ = [
    "MAX_LAYER_ERROR",
    "SPACE_VERSION",
    "SearchSpace",
    "StudyMismatchError",
    "completed",
    "default_storage_url",
    "fingerprint",
    "open_storage",
    "open_study",
    "parse_storage",
    "run_study",
    "seed_configs",
    "storage_label",
    "trial_point",
]

SPACE_VERSION = 1
# A layer setting whose output is off by more than this fraction of the output's norm is not a
# candidate at any speed: the model would be broken there (typical chosen settings: 0.01-0.1).
MAX_LAYER_ERROR = 0.35
SMALL_N = 2048  # at or below this many tokens, 16/32-token tiles are allowed (tiny CPU models)
SEGMENT_BLOCKS = (1, 2, 4, 8)
MIN_TAIL, MAX_TAIL = 1e-3, 0.8  # 1 - threshold, sampled on a log scale: thresholds 0.2 ... 0.999
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
HEARTBEAT_S = 20  # RDB storages: a trial whose process died is failed and retried after ~3x this


# ---------------------------------------------------------------------------------------------
# Search space.


@dataclass(frozen=True)
class SearchSpace:
    """The per-layer knobs searched at one prompt length.

    block_size: tile edges with at least 4 blocks in the prompt; 16/32 only for short prompts.
    segment_blocks: segment = this many blocks, clipped so that the prompt spans >= 2 segments
    (a single segment is dense attention). threshold: 1 - tail, tail log-uniform in
    [MIN_TAIL, MAX_TAIL], so 0.99 vs 0.999 is as far apart as 0.9 vs 0.99.
    """

    n_tokens: int
    block_sizes: tuple[int, ...]
    segment_blocks: tuple[int, ...] = SEGMENT_BLOCKS
    min_seq_len: int = 0

    @classmethod
    def for_length(cls, n_tokens: int, *, min_seq_len: int = 0) -> SearchSpace:
        sizes = tuple(b for b in BLOCK_SIZES if n_tokens >= 4 * b and (b >= 64 or n_tokens <= SMALL_N))
        if not sizes:
            raise SeqLenTooShort(n_tokens, 4 * BLOCK_SIZES[0])
        return cls(n_tokens=n_tokens, block_sizes=sizes, min_seq_len=min_seq_len)

    def seed_block_size(self) -> int:
        """The block size to start from: the largest that still cuts the prompt into >= 16
        blocks (selection needs blocks to choose between), else the smallest."""
        fine = [b for b in self.block_sizes if self.n_tokens // b >= 16]
        return max(fine) if fine else min(self.block_sizes)

    def identity(self) -> dict[str, Any]:
        return {
            "space_version": SPACE_VERSION,
            "n_tokens": self.n_tokens,
            "block_sizes": list(self.block_sizes),
            "segment_blocks": list(self.segment_blocks),
            "tail": [MIN_TAIL, MAX_TAIL],
            "max_layer_error": MAX_LAYER_ERROR,
        }

    def config(self, block_size: int, segment_blocks: int, threshold: float, permute: bool) -> LayerConfig:
        from pbs_kernels.profile import LayerConfig

        most = max(1, (self.n_tokens // 2) // block_size)
        return LayerConfig(
            block_size=block_size,
            segment_size=block_size * min(segment_blocks, most),
            threshold=threshold,
            permute=permute,
            min_seq_len=self.min_seq_len,
        )

    def suggest(self, trial: optuna.Trial) -> LayerConfig:
        b = trial.suggest_categorical("block_size", list(self.block_sizes))
        m = trial.suggest_categorical("segment_blocks", list(self.segment_blocks))
        tail = trial.suggest_float("tail", MIN_TAIL, MAX_TAIL, log=True)
        permute = trial.suggest_categorical("permute", [True, False])
        # Four decimals: what a profile shows, and finer than selection can tell apart.
        threshold = min(round(1.0 - tail, 4), 1.0 - MIN_TAIL)
        return self.config(b, m, threshold, permute)

    def params(self, config: LayerConfig) -> dict[str, Any]:
        """Trial parameters that reproduce `config` (for enqueue_trial)."""
        tail = min(max(1.0 - config.threshold, MIN_TAIL), MAX_TAIL)
        blocks = config.segment_size // config.block_size
        m = min(self.segment_blocks, key=lambda s: (abs(s - blocks), s))
        return {"block_size": config.block_size, "segment_blocks": m, "tail": tail, "permute": config.permute}


def seed_configs(space: SearchSpace, analysis: LayerAnalysis | None) -> list[LayerConfig]:
    """Starting points for a layer's study, from `pbs_kernels.analysis.analyze_layer` figures.

    permute: on when permuting lowers the oracle density (the tiles needed to cover the mass),
    off when it does not (e.g. 'slash' heads, whose diagonals permutation scatters). threshold:
    the selection's recall at 0.9 says how far the estimate misses; layers that recall less get
    higher thresholds. Without an analysis: the method's defaults.
    """
    b = analysis.block_size if analysis is not None else space.seed_block_size()
    if b not in space.block_sizes:
        b = space.seed_block_size()
    m = 2  # the method's default segment (256 = 2 x 128)
    if analysis is None:
        return [space.config(b, m, t, True) for t in (0.9, 0.97, 0.8)]
    gain = float(analysis.oracle_density.mean()) / max(float(analysis.oracle_density_perm.mean()), 1e-9)
    permute = gain >= 1.0
    recall = float((analysis.pbs_recall if permute else analysis.pbs_recall_noperm).mean())
    if recall < 0.85:
        thresholds = (0.95, 0.99, 0.9)
    elif recall > 0.95:
        thresholds = (0.9, 0.8, 0.95)
    else:
        thresholds = (0.9, 0.95, 0.8)
    seeds = [space.config(b, m, t, permute) for t in thresholds]
    if abs(gain - 1.0) < 0.05:  # undecided: try the other way too
        seeds.append(space.config(b, m, 0.9, not permute))
    return seeds


# ---------------------------------------------------------------------------------------------
# Storage and studies.


def storage_label(url: str) -> str:
    """The storage URL with any password hidden, for messages and JSON."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def default_storage_url(out: Path) -> str:
    return f"sqlite:///{out.resolve().with_suffix('.optuna.db')}"


def parse_storage(spec: str) -> tuple[str, str]:
    """("journal", path) or ("rdb", url) from a storage spec; StorageInvalid for anything else.

    Accepted: SQLAlchemy URLs (sqlite:///FILE, postgresql://..., mysql://...), `journal:FILE`
    or FILE.log / FILE.journal (Optuna's journal file: append-only, fine on NFS), FILE.db."""
    spec = spec.strip()
    if spec.startswith("journal:"):
        path = spec[len("journal:"):].removeprefix("//")
        if path:
            return "journal", path
    elif "://" in spec:
        return "rdb", spec
    else:
        p = Path(spec)
        if p.suffix in JOURNAL_SUFFIXES:
            return "journal", spec
        if p.suffix in SQLITE_SUFFIXES:
            return "rdb", f"sqlite:///{p.resolve()}"
    raise StorageInvalid(spec)


def open_storage(spec: str | None, out: Path):
    """(storage object, label) for `--storage` (None: a SQLite file beside `out`)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    kind, url = parse_storage(spec if spec is not None else default_storage_url(out))
    path = Path(url) if kind == "journal" else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return JournalStorage(JournalFileBackend(str(path))), f"journal:{path}"
        except OSError as e:
            raise StorageUnwritable(path, str(e.strerror or e)) from None

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several local processes may write one file: wait for the lock instead of failing.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        with warnings.catch_warnings():
            # Heartbeats are "experimental" in Optuna 5 (since 2.x); they are how the trial of a
            # killed worker gets failed and queued again, so use them without a warning per run.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=3 * HEARTBEAT_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
                **kwargs,
            )
    except ImportError as e:
        raise StorageDriverMissing(storage_label(url), str(e)) from None
    except Exception as e:  # SQLAlchemy's errors: bad URL, unreachable server, locked file...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PbsError(f"cannot open Optuna storage {storage_label(url)} ({first})") from None
    return storage, storage_label(url)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (calibration token ids, settings)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def open_study(storage, name: str, identity: dict[str, Any], *, seed: int, n_startup: int = 8) -> optuna.Study:
    """Create or load study `name`; refuse one that was made under another `identity`.
    n_startup: trials (seeds included) before TPE models the results instead of sampling at random."""
    import optuna

    probe = optuna.load_study(study_name=name, storage=storage) if _exists(storage, name) else None
    done = 0 if probe is None else len(probe.get_trials(deepcopy=False))
    # A fresh seed per resume: the same seed would replay the same random startup points.
    sampler = optuna.samplers.TPESampler(seed=(seed * 1_000_003 + done) % (2**32), n_startup_trials=n_startup)
    study = optuna.create_study(
        storage=storage, study_name=name, directions=["minimize", "minimize"], sampler=sampler,
        load_if_exists=True,
    )
    if study.directions != [optuna.study.StudyDirection.MINIMIZE] * 2:
        raise StudyMismatchError(name)
    recorded = study.user_attrs.get("pbs")
    if recorded is None:
        study.set_user_attr("pbs", identity)
    elif recorded != identity:
        key = next((k for k in sorted(set(recorded) | set(identity)) if recorded.get(k) != identity.get(k)), "?")
        raise StudyMismatchError(name, key, recorded.get(key), identity.get(key))
    return study


def _exists(storage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def run_study(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Sequence[float]],
    trials: int,
    *,
    seeds: Sequence[dict[str, Any]] = (),
    on_trial: Callable[[int], None] | None = None,
    catch: tuple[type[BaseException], ...] = (),
) -> tuple[int, int]:
    """Bring `study` to `trials` completed trials; returns (completed before, run now).

    Seeds are enqueued once (a rerun or another worker skips those already there). Several
    workers can run this on one study: each stops when the study holds `trials` completed.
    on_trial(n_completed) after each trial of this process. catch: exceptions that fail one
    trial (recorded as FAIL) instead of the run.
    """
    import optuna
    from optuna.trial import TrialState

    before = len(completed(study))
    if before >= trials:
        return before, 0
    for params in seeds:
        study.enqueue_trial(params, skip_if_exists=True)

    ran = 0

    def report(st: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal ran
        ran += trial.state == TrialState.COMPLETE
        if on_trial is not None:
            on_trial(len(completed(st)))

    study.optimize(
        objective,
        n_trials=trials - before,
        catch=catch,
        callbacks=[optuna.study.MaxTrialsCallback(trials, states=(TrialState.COMPLETE,)), report],
    )
    return before, ran


def trial_point(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """What a completed trial measured, from its values and user attributes."""
    measure = trial.user_attrs.get("measure") or {}
    error, cost = trial.values
    return {
        "trial": trial.number,
        "config": trial.user_attrs.get("config"),
        "error": error,
        "recall": measure.get("recall"),
        "density": measure.get("density"),
        "cost": cost,
        "predicted_cost": measure.get("predicted_cost"),
        "time_ms": measure.get("time_ms"),
    }

