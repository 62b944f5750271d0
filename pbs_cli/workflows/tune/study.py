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

import contextlib
import functools
import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pbs_kernels.limits import BLOCK_SIZES, ESTIMATORS, THRESHOLD_MASS, VERTICAL_KEYS
from pbs_kernels.settings import PbsSettings

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
    "check_storage",
    "interruptible",
    "open_storage",
    "open_study",
    "parse_storage",
    "run_study",
    "seed_configs",
    "storage_label",
    "trial_point",
]

# 2: estimator and threshold_mass searched; 3: vertical_keys searched; 4: threshold_mass "head"
# (older studies are not resumed)
SPACE_VERSION = 4
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

    def config(self, settings: PbsSettings) -> LayerConfig:
        """The profile layer of `settings`' per-layer fields: its segment clipped so that the
        tuned length holds at least two (never under one block), and this space's min_seq_len."""
        from pbs_kernels.profile import LayerConfig

        b = settings.block_size
        most = max(1, (self.n_tokens // 2) // b)
        return LayerConfig(**{**settings.layer_kwargs(), "segment_size": min(settings.segment_size, b * most)},
                           min_seq_len=self.min_seq_len)

    def suggest(self, trial: optuna.Trial) -> LayerConfig:
        b = trial.suggest_categorical("block_size", list(self.block_sizes))
        m = trial.suggest_categorical("segment_blocks", list(self.segment_blocks))
        tail = trial.suggest_float("tail", MIN_TAIL, MAX_TAIL, log=True)
        permute = trial.suggest_categorical("permute", [True, False])
        # Neither estimator nor threshold rule wins on every layer (BENCHMARKS.md, section 8).
        estimator = trial.suggest_categorical("estimator", list(ESTIMATORS))
        mass = trial.suggest_categorical("threshold_mass", list(THRESHOLD_MASS))
        # Scattered keys every query needs are cheap to keep exactly (BENCHMARKS.md, section 11).
        vertical = trial.suggest_categorical("vertical_keys", list(VERTICAL_KEYS))  # all <= the smallest block
        # Four decimals: what a profile shows, and finer than selection can tell apart.
        threshold = min(round(1.0 - tail, 4), 1.0 - MIN_TAIL)
        return self.config(PbsSettings(block_size=b, segment_size=b * m, threshold=threshold, permute=permute,
                                       estimator=estimator, threshold_mass=mass, vertical_keys=vertical))

    def params(self, config: LayerConfig) -> dict[str, Any]:
        """Trial parameters that reproduce `config` (for enqueue_trial)."""
        tail = min(max(1.0 - config.threshold, MIN_TAIL), MAX_TAIL)
        blocks = config.segment_size // config.block_size
        m = min(self.segment_blocks, key=lambda s: (abs(s - blocks), s))
        return {"block_size": config.block_size, "segment_blocks": m, "tail": tail, "permute": config.permute,
                "estimator": config.estimator, "threshold_mass": config.threshold_mass,
                "vertical_keys": min(VERTICAL_KEYS, key=lambda n: (abs(n - config.vertical_keys), n))}


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
    base = PbsSettings(block_size=b, segment_size=2 * b)  # the method's default segment (256 = 2 x 128)
    if analysis is None:
        return [space.config(base.replace(threshold=t)) for t in (0.9, 0.97, 0.8)]
    gain = float(analysis.oracle_density.mean()) / max(float(analysis.oracle_density_perm.mean()), 1e-9)
    permute = gain >= 1.0
    recall = float((analysis.pbs_recall if permute else analysis.pbs_recall_noperm).mean())
    if recall < 0.85:
        thresholds = (0.95, 0.99, 0.9)
    elif recall > 0.95:
        thresholds = (0.9, 0.8, 0.95)
    else:
        thresholds = (0.9, 0.95, 0.8)
    seeds = [space.config(base.replace(threshold=t, permute=permute)) for t in thresholds]
    if abs(gain - 1.0) < 0.05:  # undecided: try the other way too
        seeds.append(space.config(base.replace(threshold=0.9, permute=not permute)))
    first = base.replace(threshold=thresholds[0], permute=permute)
    # The estimator that sees lone strong keys, at the first threshold (section 8 of BENCHMARKS.md).
    seeds.append(space.config(first.replace(estimator="top")))
    # Each segment's two strongest keys kept exactly (scattered "vertical" keys; section 11).
    seeds.append(space.config(first.replace(vertical_keys=2)))
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


def storage_file(spec: str | None, out: Path) -> Path | None:
    """The local file a storage writes (a journal or SQLite file), None for a database server."""
    kind, url = parse_storage(spec if spec is not None else default_storage_url(out))
    if kind == "journal":
        return Path(url)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///"):])
    return None


def check_storage(spec: str | None, out: Path) -> None:
    """StorageUnwritable, before any work, when the storage's local file cannot be written."""
    from ..errors import OutputUnwritable
    from ..outputs import check_out_file

    if spec is not None:
        kind, url = parse_storage(spec)
        if kind == "rdb":
            check_database_url(url)
    path = storage_file(spec, out)
    if path is not None:
        try:
            check_out_file(path)
        except OutputUnwritable as e:
            raise StorageUnwritable(path, e.reason) from None


def check_database_url(url: str) -> None:
    """A database URL SQLAlchemy can parse, of a database it knows, with its driver installed:
    checked without connecting, so a typo fails before the calibration prefill, not after."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(url).get_dialect()
        getattr(dialect, "import_dbapi", getattr(dialect, "dbapi", lambda: None))()  # the driver
    except ImportError as e:
        raise StorageDriverMissing(storage_label(url), str(e)) from None
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise StorageInvalid(storage_label(url)) from None


def open_storage(spec: str | None, out: Path):
    """(storage object, label) for `--storage` (None: a SQLite file beside `out`)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    check_storage(spec, out)
    kind, url = parse_storage(spec if spec is not None else default_storage_url(out))
    local = storage_file(spec, out)
    if local is not None:
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageUnwritable(local, str(e.strerror or e)) from None
    if kind == "journal":
        try:
            return JournalStorage(JournalFileBackend(str(local))), f"journal:{local}"
        except OSError as e:
            raise StorageUnwritable(local, str(e.strerror or e)) from None

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
        from ..errors import summary

        first = summary(e)
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
    n_startup: trials (seeds included) before TPE models the results instead of sampling at random.

    Loading a study also fails the trials a killed run left RUNNING (`fail_orphans`), so a
    resumed run re-runs them and nothing stays RUNNING forever (a journal storage has no
    heartbeat that would ever fail them)."""
    import optuna

    study = optuna.create_study(
        storage=storage, study_name=name, directions=["minimize", "minimize"],
        sampler=replayable_sampler(seed, n_startup), load_if_exists=True,
    )
    if study.directions != [optuna.study.StudyDirection.MINIMIZE] * 2:
        raise StudyMismatchError(name)
    recorded = study.user_attrs.get("pbs")
    if recorded is None:
        study.set_user_attr("pbs", identity)
    elif recorded != identity:
        key = next((k for k in sorted(set(recorded) | set(identity)) if recorded.get(k) != identity.get(k)), "?")
        raise StudyMismatchError(name, key, recorded.get(key), identity.get(key))
    fail_orphans(study)
    return study


# ---------------------------------------------------------------------------------------------
# Resuming: the same profile as an uninterrupted run, and no trial left RUNNING by a kill.

WORKER_ATTR = "pbs_worker"  # on a trial: the worker running it, set as its objective starts
WORKERS_PREFIX = "pbs_worker:"  # on the study, one key per worker process: where and whether it runs
NOTE_ATTR = "pbs_note"  # why pbs failed a trial itself
RETRY_ATTR = "pbs_retry_of"  # on a re-enqueued trial: the number of the orphan it replaces
INTERRUPTED_PREFIX = "pbs_interrupted:"  # on the study, one key per trial Ctrl-C stopped: the note
# A RUNNING trial no worker claimed, in a study that records no workers (made before they were
# recorded), is an orphan once this old.
UNTAGGED_GRACE_S = 60


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _worker() -> dict[str, Any]:
    import os
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid())}


def _worker_key(worker: dict[str, Any]) -> str:
    return f"{WORKERS_PREFIX}{worker['host']}:{worker['pid']}:{worker.get('start')}"


def _alive(worker: dict[str, Any], me: dict[str, Any]) -> bool | None:
    """Whether `worker` still runs: None when it cannot be known (another machine)."""
    import os

    if worker.get("host") != me["host"] or not isinstance(worker.get("pid"), int):
        return None
    if worker["pid"] == me["pid"]:
        return True
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    start = worker.get("start")
    return start is None or _proc_start(worker["pid"]) in (None, start)


def _orphan_reason(trial: optuna.trial.FrozenTrial, me: dict[str, Any], workers: list[dict[str, Any]]) -> str | None:
    """Why `trial` (RUNNING) can never finish, or None when a live worker may still run it.
    workers: the study's workers not recorded as done. Workers on other machines cannot be
    checked: their trials are left alone (on a database storage, Optuna's heartbeat fails them
    ~1 minute after their worker died)."""
    from datetime import datetime

    worker = trial.user_attrs.get(WORKER_ATTR)
    if isinstance(worker, dict):
        if _alive(worker, me) is False:
            return f"its process (pid {worker['pid']} on {worker['host']}) is gone"
        return None
    # Not claimed yet: the worker died between starting the trial and its objective's first line.
    if workers:
        if all(_alive(w, me) is False for w in workers):
            return "it was started by a process that is gone (" + ", ".join(
                f"pid {w['pid']} on {w['host']}" for w in workers) + ")"
        return None
    if trial.datetime_start is not None:
        age = (datetime.now() - trial.datetime_start).total_seconds()
        if age > UNTAGGED_GRACE_S:
            return f"it started {age:.0f} s ago and no process ever claimed it"
    return None


def fail_orphans(study: optuna.Study) -> list[int]:
    """Mark FAIL, with a note, the RUNNING trials whose process is dead; enqueue again the fixed
    settings (seed configs) of those that had them, so the study evaluates every seed exactly once.
    Sampled ones need no copy: the replayable sampler draws the same settings again. Returns the
    numbers of the trials failed."""
    from datetime import datetime

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    me = _worker()
    storage = study._storage  # the storage API (set_trial_*) is public; Study exposes no setter
    workers = [w for k, w in study.user_attrs.items()
               if k.startswith(WORKERS_PREFIX) and isinstance(w, dict) and w.get("state") != "done"]
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _orphan_reason(trial, me, workers)
        if reason is None:
            continue
        note = (f"failed by pbs tune on resume at {datetime.now().isoformat(timespec='seconds')}: {reason} "
                "(killed or crashed); its settings are evaluated again")
        try:
            storage.set_trial_user_attr(trial._trial_id, NOTE_ATTR, note)
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # finished meanwhile after all
            continue
        failed.append(trial.number)
        fixed = trial.system_attrs.get("fixed_params")
        if fixed:
            study.enqueue_trial(dict(fixed), user_attrs={RETRY_ATTR: trial.number})
    return failed


def _counted(study: optuna.Study) -> int:
    """Finished trials that a run not interrupted would also have: orphans of a killed run (failed
    by `fail_orphans` or by Optuna's heartbeat, which re-enqueues them as 'failed_trial') are not."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    retried = {t.system_attrs.get("failed_trial") for t in trials} | {t.user_attrs.get(RETRY_ATTR) for t in trials}
    interrupted = {k for k in study.user_attrs if k.startswith(INTERRUPTED_PREFIX)}
    return sum(1 for t in trials if t.state != TrialState.FAIL
               or (NOTE_ATTR not in t.user_attrs and t.number not in retried
                   and f"{INTERRUPTED_PREFIX}{t.number}" not in interrupted))


@functools.cache
def _sampler_class():
    import optuna

    class _Replayable(optuna.samplers.BaseSampler):
        """TPE whose random state before each trial is a function of (seed, finished trials).

        One TPESampler seeded once draws from a stream that a kill cuts: a resumed run used to
        start a new stream, so it sampled other settings than an uninterrupted run and ended on
        another profile. Here the k-th trial's draw depends only on the seed and the k trials
        before it (which TPE reads from the study), however many runs it took to get there. With
        the CPU cost model (deterministic figures) a resumed run writes the same profile; with
        measured GPU times the figures themselves vary from run to run. Several workers sharing
        a study interleave their trials, so their result depends on timing either way.
        """

        def __init__(self, seed: int, n_startup: int) -> None:
            self._seed, self._n_startup = seed, n_startup
            self._inner = self._tpe(0)

        def _tpe(self, k: int):
            return optuna.samplers.TPESampler(seed=(self._seed * 1_000_003 + k) % (2**32),
                                              n_startup_trials=self._n_startup)

        def before_trial(self, study, trial) -> None:
            self._inner = self._tpe(_counted(study))
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self._inner.after_trial(study, trial, state, values)

    return _Replayable


def replayable_sampler(seed: int, n_startup: int):
    """The sampler of every pbs tune study (see `_sampler_class`); optuna is imported on first use."""
    return _sampler_class()(seed, n_startup)


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
    worker = _worker()
    # Registered before any trial starts, so a trial this process leaves unclaimed (killed between
    # Optuna starting it and `tagged`) is known to be its own.
    study.set_user_attr(_worker_key(worker), {**worker, "state": "running"})

    def tagged(trial: optuna.Trial):
        # First thing: a worker that dies from now on leaves a trial that `fail_orphans` can tell
        # from one still running.
        trial.set_user_attr(WORKER_ATTR, worker)
        try:
            interrupts.check()  # a Ctrl-C that came while Optuna started the trial
            return objective(trial)
        except KeyboardInterrupt:
            # Still RUNNING here, so the trial itself can carry the note (`_interrupted` also
            # records it on the study, which is what the samplers' count reads).
            stopped.append(trial._trial_id)
            trial.set_user_attr(NOTE_ATTR, "interrupted (Ctrl-C); its settings are evaluated again on resume")
            raise

    def report(st: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal ran
        ran += trial.state == TrialState.COMPLETE
        if on_trial is not None:
            on_trial(len(completed(st)))
        interrupts.check()  # a Ctrl-C that came while Optuna stored the trial

    state = "done"
    stopped: list[int] = []  # the trial Ctrl-C stopped (its id)
    quiet = _QuietInterrupt()
    logger = logging.getLogger("optuna.study._optimize")
    logger.addFilter(quiet)
    try:
        with _deferred_interrupts() as interrupts:
            study.optimize(
                tagged,
                n_trials=trials - before,
                catch=catch,
                callbacks=[optuna.study.MaxTrialsCallback(trials, states=(TrialState.COMPLETE,)), report],
            )
            interrupts.check()
    except KeyboardInterrupt:
        # Optuna records the trial Ctrl-C stopped as FAIL. Recorded as interrupted it is an
        # orphan to re-run, not a finished trial: the samplers' count (`_counted`) then matches
        # an uninterrupted run. A Ctrl-C outside a trial's computation is raised only between
        # trials (`_Interrupts`), so nothing else is half-done; a worker marked "interrupted"
        # rather than done still lets the next run's `fail_orphans` fail any RUNNING trial left.
        state = "interrupted"
        if stopped:
            _interrupted(study, stopped[-1])
        raise
    finally:  # an exception fails its trial itself (Optuna); only a kill leaves one RUNNING
        logger.removeFilter(quiet)
        study.set_user_attr(_worker_key(worker), {**worker, "state": state})
    return before, ran


class _Interrupts:
    """Ctrl-C (SIGINT) during a study: raised at once inside a trial's computation
    (`interruptible`), held back while Optuna writes the storage, where a KeyboardInterrupt
    can break a journal file's lock (seen: FileNotFoundError on its .rename file) and leave
    a trial half-recorded. A held-back Ctrl-C is raised at the next safe point; a second one
    at once."""

    def __init__(self) -> None:
        self.pending = False
        self.open = False

    def handler(self, signum, frame) -> None:
        if self.open or self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt


_INTERRUPTS: _Interrupts | None = None


@contextlib.contextmanager
def _deferred_interrupts():
    """Install `_Interrupts` as the SIGINT handler (main thread only) for the block."""
    import signal
    import threading

    global _INTERRUPTS
    it = _Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield it  # no handler outside the main thread: Ctrl-C acts as Python's default there
        return
    previous = signal.signal(signal.SIGINT, it.handler)
    _INTERRUPTS = it
    try:
        yield it
    finally:
        _INTERRUPTS = None
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def interruptible():
    """Where a Ctrl-C may stop a trial at once: its computation, which writes no storage.

        with interruptible():
            m = evaluator.evaluate(cfg)
    """
    it = _INTERRUPTS
    if it is None:
        yield
        return
    it.check()
    it.open = True
    try:
        yield
    finally:
        it.open = False


class _QuietInterrupt(logging.Filter):
    """Drops Optuna's two "Trial N failed" warnings (one with a 30-60-line traceback) for a
    Ctrl-C: the command says "interrupted" in one line instead."""

    def __init__(self) -> None:
        super().__init__()
        self._trial: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage()
        if isinstance(exc, KeyboardInterrupt):
            self._trial = text.split(" failed", 1)[0]  # "Trial 7"
            return False
        # The second warning, "Trial 7 failed with value None.", carries no exception.
        return not (self._trial is not None and text.startswith(f"{self._trial} failed with value"))


def _interrupted(study: optuna.Study, trial_id: int) -> None:
    """The trial Ctrl-C stopped: FAIL, recorded as interrupted on the study (where the samplers'
    count reads it; Optuna refuses attributes on a finished trial), and its fixed settings (a
    seed) queued again, so the study evaluates every seed once."""
    from datetime import datetime

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    trial = study._storage.get_trial(trial_id)
    if trial.state == TrialState.RUNNING:
        try:
            study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # finished meanwhile after all
            pass
    study.set_user_attr(f"{INTERRUPTED_PREFIX}{trial.number}",
                        f"interrupted (Ctrl-C) at {datetime.now().isoformat(timespec='seconds')}; "
                        "its settings are evaluated again on resume")
    fixed = trial.system_attrs.get("fixed_params")
    if fixed:
        study.enqueue_trial(dict(fixed), user_attrs={RETRY_ATTR: trial.number})


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

