"""Errors the user can fix: the `PbsError` family.

Workflows raise them with the facts as fields and a one-line message that names no
command-line flag (a Python caller has none). The `pbs` command words each class for the
command line in one table (`pbs_cli.commands._messages`), naming the flag and the fix, and
`pbs_cli.app` is the only place that prints them (exit 1).
"""

from __future__ import annotations


def summary(e: BaseException | str, limit: int = 300) -> str:
    """The first line of another library's error, for quoting in a one-line message: cut only at a
    sentence end, never mid-sentence (transformers' first lines run to 400 characters)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if not text:
        return type(e).__name__ if isinstance(e, BaseException) else ""
    if len(text) <= limit:
        return text.rstrip(".")
    cut = text.rfind(". ", 0, limit)
    return text[:cut] if cut > 0 else text.split(". ")[0].rstrip(".")


class PbsError(Exception):
    """Base of every expected failure; the message is one line, shown without a traceback.

    `shown_as` is the wording the calling interface chose for it (the CLI's, naming flags); once
    set, str() gives that wording, so whoever displays the error shows what the user typed.
    """

    exit_code = 1
    shown_as: str | None = None
    # Whether the `PBS_DEBUG=1` hint is printed. Not after an outcome that is the whole story (a
    # target out of reach, missed or above the bound, Ctrl-C): it would send the user looking
    # for a bug that is not there.
    debug_hint = True

    def __str__(self) -> str:
        return self.shown_as if self.shown_as is not None else super().__str__()


class UsageError(PbsError):
    """Settings that parse but cannot work together, or do not fit the model or the input."""


class Interrupted(PbsError):
    """Ctrl-C (SIGINT) stopped the work. `command`: which one (tune resumes on a rerun)."""

    exit_code = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C
    debug_hint = False

    def __init__(self, command: str | None = None) -> None:
        self.command = command
        super().__init__("interrupted")


class ModelError(PbsError):
    """A model id or folder that cannot be loaded or is not a supported architecture."""


class DeviceError(PbsError):
    """The requested device or dtype is unavailable (no CUDA, bf16 on an old card...)."""


class ProfileFileError(PbsError):
    """A profile YAML that is missing or malformed (wraps pbs_kernels.profile.ProfileError)."""


# -- device and dtype -------------------------------------------------------------------------


class CudaUnavailable(DeviceError):
    def __init__(self) -> None:
        super().__init__("CUDA was requested but no CUDA GPU is available; use the CPU or auto")


class Bf16Unsupported(DeviceError):
    def __init__(self) -> None:
        super().__init__("this GPU does not support bf16; use fp16")


class GpuRequired(DeviceError):
    """A workflow that times GPU kernels found no GPU; `cpu_max_len` bounds its CPU check pass."""

    def __init__(self, cpu_max_len: int) -> None:
        self.cpu_max_len = cpu_max_len
        super().__init__(f"no CUDA GPU found: the bench times GPU kernels; run it on the CPU for a "
                         f"correctness-only pass on small sizes (<= {cpu_max_len} tokens)")


class OutOfMemoryAt(DeviceError):
    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        super().__init__(f"out of GPU memory at {seq_len} tokens; use a shorter length or fewer heads")


# -- model, layers, prompt --------------------------------------------------------------------


class ModelUnsupported(ModelError):
    """No attention layer PBS can drive (`detail`: the integration's own explanation)."""

    def __init__(self, model: str, cls: str, detail: str | None = None) -> None:
        self.model, self.cls, self.detail = model, cls, detail
        super().__init__(f"{model}: {detail}" if detail else
                         f"{model}: {cls} has no attention layers that PBS can drive "
                         "(none goes through transformers' AttentionInterface)")


class AttentionNotCaptured(ModelError):
    def __init__(self, model: str, cls: str) -> None:
        self.model, self.cls = model, cls
        super().__init__(f"{model}: {cls} computes attention without transformers' AttentionInterface, "
                         "so PBS cannot capture, analyse, tune or run it")


class ModelConfigUnreadable(ModelError):
    """The folder's config.json exists but cannot be read (`reason`: what is wrong with it)."""

    def __init__(self, model: str, path, reason: str) -> None:
        self.model, self.path, self.reason = model, path, reason
        super().__init__(f"{model}: cannot read {path} ({reason}); save the model again with save_pretrained "
                         "or fix the file")


class ModelTypeUnknown(ModelError):
    def __init__(self, model: str, model_type: str, transformers_version: str) -> None:
        self.model, self.model_type, self.transformers_version = model, model_type, transformers_version
        super().__init__(f"{model}: model type {model_type!r} is unknown to transformers {transformers_version}; "
                         "upgrade transformers (pip install -U transformers) or use a model it supports")


class WeightsUnreadable(ModelError):
    """A weights file that is cut short or damaged (`reason`), e.g. a download that stopped."""

    def __init__(self, model: str, path, reason: str) -> None:
        self.model, self.path, self.reason = model, path, reason
        super().__init__(f"{model}: the weights file {path} is damaged: {reason}; download or save the model again")


class LayerMissing(UsageError):
    def __init__(self, layer: int, num_layers: int) -> None:
        self.layer, self.num_layers = layer, num_layers
        super().__init__(f"layer {layer} does not exist; the model has {num_layers} layers (0-{num_layers - 1})")


class LayerSpecInvalid(UsageError):
    """A layer list like '0,2,5-7' that does not parse; `detail` says where."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"layer list {detail}")


class SeqLenTooLong(UsageError):
    def __init__(self, seq_len: int, limit: int, model: str) -> None:
        self.seq_len, self.limit, self.model = seq_len, limit, model
        super().__init__(f"{seq_len} tokens exceed {model}'s max_position_embeddings {limit}")


class InputFileError(UsageError):
    """The prompt file cannot serve; `detail` starts with its path ('p.txt: file not found')."""

    def __init__(self, path, detail: str) -> None:
        self.path, self.detail = path, detail
        super().__init__(f"prompt file {detail}")


class NoTokenizer(UsageError):
    def __init__(self, model: str, source: str) -> None:
        self.model, self.source = model, source
        super().__init__(f"a prompt text needs a tokenizer and {model} has none (no tokenizer files in {source}); "
                         "use synthetic tokens")


class PromptTooShort(UsageError):
    """The prompt has fewer tokens than asked and repeating it was refused. source: its path,
    None for the built-in synthetic text."""

    def __init__(self, source: str | None, tokens: int, seq_len: int) -> None:
        self.source, self.tokens, self.seq_len = source, tokens, seq_len
        what = "the synthetic text" if source is None else source
        super().__init__(f"{what} has {tokens} tokens, fewer than the {seq_len} asked for")


# -- bench ------------------------------------------------------------------------------------


class WorkloadUnknown(UsageError):
    def __init__(self, workload: str) -> None:
        self.workload = workload
        super().__init__(f"workload {workload!r} is unknown; use synthetic or captured")


class HeadsNotMultiple(UsageError):
    def __init__(self, heads: int, kv_heads: int) -> None:
        self.heads, self.kv_heads = heads, kv_heads
        super().__init__(f"{heads} query heads are not a multiple of {kv_heads} key/value heads; "
                         "grouped-query attention needs it")


class SeqLenNotAboveSegment(UsageError):
    def __init__(self, seq_len: int, segment_size: int) -> None:
        self.seq_len, self.segment_size = seq_len, segment_size
        self.suggested = max(2 * segment_size, 1024)
        super().__init__(f"{seq_len} tokens are not more than segment_size {segment_size}: PBS would run dense "
                         f"attention; use {self.suggested} tokens or more")


class ProfileNotForModel(UsageError):
    """The profile sets layers the model does not have: it was tuned for another model."""

    def __init__(self, profile: str, layer: int, model: str, num_layers: int) -> None:
        self.profile, self.layer, self.model, self.num_layers = profile, layer, model, num_layers
        super().__init__(f"profile {profile} sets layer {layer} but {model} has {num_layers} layers "
                         f"(0-{num_layers - 1}); use a profile tuned for this model")


class E2EUnavailable(UsageError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"timing a model end to end needs pbs_kernels.integrations.hf, which cannot be "
                         f"imported here ({reason})")


# -- tune -------------------------------------------------------------------------------------


class TrialsTooFew(UsageError):
    def __init__(self, trials: int) -> None:
        self.trials = trials
        super().__init__(f"{trials} trials per layer: there must be at least 1")


class SeqLenTooShort(UsageError):
    def __init__(self, seq_len: int, minimum: int) -> None:
        self.seq_len, self.minimum = seq_len, minimum
        super().__init__(f"{seq_len} tokens is too short to tune; use at least {minimum} tokens")


class TargetAboveBound(UsageError):
    """A target speedup above what attention could reach with no tiles computed at all: the
    cost model's fixed share (selection, sorting, launches) bounds the speedup (Amdahl)."""

    debug_hint = False

    def __init__(self, target: float, bound: float, cost_model: str, seq_len: int) -> None:
        self.target, self.bound, self.cost_model, self.seq_len = target, bound, cost_model, seq_len
        super().__init__(f"target {target:g}x is above {bound:.1f}x, the most any setting could give at {seq_len} "
                         f"tokens even computing no tiles (the {cost_model} cost model's fixed share for "
                         f"selection); use a target below {bound:.1f}x")


class TargetMissed(PbsError):
    """The tuned profile, checked on held-out text, is slower than the target (`speedup`)."""

    debug_hint = False

    def __init__(self, target: float, speedup: float, cost_model: str, path) -> None:
        self.target, self.speedup, self.cost_model, self.path = target, speedup, cost_model, path
        super().__init__(f"the tuned profile gives {speedup:.2f}x ({cost_model}) on held-out text, below the "
                         f"{target:g}x target; it was not saved: keep it anyway, lower the target, or tune on "
                         "more typical text")


class TargetUnreachableError(PbsError):
    """No combination of the settings found reaches the target speedup."""

    debug_hint = False

    def __init__(self, target: float, best_speedup: float, cost_model: str, seq_len: int) -> None:
        self.target, self.best_speedup, self.cost_model, self.seq_len = target, best_speedup, cost_model, seq_len
        super().__init__(f"target {target:g}x is out of reach: the fastest settings found give {best_speedup:.2f}x "
                         f"({cost_model} attention speedup at {seq_len} tokens); lower the target, run more "
                         "trials, or tune at a longer length")


class AccuracyUnreachableError(PbsError):
    """No allocation at the target speedup keeps task accuracy within the allowed drop.
    best: the fastest (speedup, accuracy) pair found within the drop, or, when none held, the
    most accurate one checked; accuracies are fractions."""

    debug_hint = False

    def __init__(self, target: float, max_drop: float, dense_accuracy: float, best_speedup: float,
                 best_accuracy: float, within: bool, cost_model: str, seq_len: int) -> None:
        self.target, self.max_drop, self.dense_accuracy = target, max_drop, dense_accuracy
        self.best_speedup, self.best_accuracy, self.within = best_speedup, best_accuracy, within
        self.cost_model, self.seq_len = cost_model, seq_len
        best = "the fastest profile within it" if within else "the most accurate profile checked"
        super().__init__(
            f"target {target:g}x is out of reach within a {max_drop:g}-point accuracy drop (dense "
            f"{100 * dense_accuracy:.1f}% on held-out retrieval prompts at {seq_len} tokens): {best} gives "
            f"{best_speedup:.2f}x ({cost_model}) at {100 * best_accuracy:.1f}%; lower the target or allow a larger drop")


class StorageInvalid(UsageError):
    def __init__(self, spec: str) -> None:
        self.spec = spec
        super().__init__(f"{spec!r} is not a storage; use sqlite:///FILE.db, postgresql://USER@HOST/DB, "
                         "mysql://..., journal:FILE or FILE.log")


class StorageUnwritable(PbsError):
    def __init__(self, path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"cannot write the storage file {path} ({reason}); use a writable storage")


class StorageDriverMissing(PbsError):
    def __init__(self, label: str, reason: str) -> None:
        self.label, self.reason = label, reason
        super().__init__(f"storage {label}: the database driver is missing ({reason}); install it, e.g. "
                         "pip install psycopg2-binary for postgresql")


class StudyMismatchError(PbsError):
    """An existing study was made under other conditions than this run's. key None: it is not a
    pbs tune study at all (other objectives)."""

    def __init__(self, study: str, key: str | None = None, recorded=None, current=None) -> None:
        self.study, self.key, self.recorded, self.current = study, key, recorded, current
        if key is None:
            text = f"study {study} in the storage is not a pbs tune study (other objectives)"
        else:
            text = f"study {study} was tuned with {key}={recorded!r}, this run has {key}={current!r}"
        super().__init__(text + "; use another study name to avoid mixing results")


# -- tensor parallelism (torchrun) -----------------------------------------------------------


class NotShardable(ModelError):
    """The model cannot be split over `world` tensor-parallel ranks: transformers has no plan for
    its architecture (heads None), or its heads do not divide evenly; `valid` lists the process
    counts that would work."""

    def __init__(self, model: str, world: int, *, arch: str, heads: int | None = None,
                 kv_heads: int | None = None, valid: list[int] | None = None) -> None:
        self.model, self.world, self.arch = model, world, arch
        self.heads, self.kv_heads, self.valid = heads, kv_heads, list(valid or [])
        if heads is None:
            text = (f"{model}: transformers has no tensor-parallel plan for {arch}, so it cannot be split over "
                    f"{world} processes; run it in one process")
        else:
            text = (f"{model}: its {heads} query heads and {kv_heads} key/value heads do not split evenly over "
                    f"{world} processes; use {' or '.join(map(str, self.valid))} processes")
        super().__init__(text)


class TensorParallelDevice(DeviceError):
    """The device cannot serve a tensor-parallel run. reason: "cpu_with_gpu" (CPU asked for on a
    machine with GPUs: transformers shards onto the GPUs regardless) or "too_few_gpus"."""

    def __init__(self, reason: str, local_world: int, gpus: int) -> None:
        self.reason, self.local_world, self.gpus = reason, local_world, gpus
        if reason == "cpu_with_gpu":
            text = ("a tensor-parallel run on the CPU needs the GPUs hidden (transformers shards onto the GPUs it "
                    "finds); set CUDA_VISIBLE_DEVICES= or run on the GPUs")
        else:
            text = f"{local_world} processes on this machine but {gpus} GPU(s); start at most {gpus} processes"
        super().__init__(text)


class NotUnderTorchrun(UsageError):
    """A workflow that cannot run tensor-parallel was launched by torchrun with `world` ranks."""

    def __init__(self, what: str, world: int) -> None:
        self.what, self.world = what, world
        super().__init__(f"{what} does not run tensor-parallel ({world} processes); run it in one process")


class TensorParallelBenchScope(UsageError):
    """Under torchrun the bench times the sharded model's first token only; `asked` names what
    else was asked for ("attention" when the end-to-end timing was not asked for)."""

    WORDS = {"attention": "the attention rows", "chunk": "chunked-prefill rows", "lengths": "varlen rows",
             "serving_only": "serving-only rows", "captured": "a captured layer"}

    def __init__(self, world: int, asked: list[str]) -> None:
        self.world, self.asked = world, list(asked)
        what = ", ".join(self.WORDS.get(a, a) for a in self.asked)
        super().__init__(f"under tensor parallelism ({world} processes) the bench times the model's first token "
                         f"only (end to end); {what} time one GPU's attention: run them in one process")


# -- outputs ----------------------------------------------------------------------------------


class OutputUnwritable(UsageError):
    """An output path that cannot be written, found before the work starts. kind: "folder" or
    "file" (what the path must be); reason: what is in the way."""

    def __init__(self, path, kind: str, reason: str) -> None:
        self.path, self.kind, self.reason = path, kind, reason
        super().__init__(f"cannot write the output {kind} {path}: {reason}; use a path you can write to")


class OutputWriteFailed(PbsError):
    """Writing the results failed after the work was done; they were saved to `saved_to`
    instead (None: nowhere, the printed output is all that is left)."""

    def __init__(self, path, reason: str, saved_to=None) -> None:
        self.path, self.reason, self.saved_to = path, reason, saved_to
        where = (f"the results were saved to {saved_to} instead; copy them from there" if saved_to is not None
                 else "the results could not be saved anywhere; rerun with a writable output path")
        super().__init__(f"cannot write {path} ({reason}); {where}")
