"""How the `pbs` command words each domain error: ONE table, class -> one-line message.

Workflows raise errors that name no flag (`pbs_cli.workflows.errors`); here each class gets the
message a command-line user needs: the flag they typed and the fix. `pbs_cli.app` applies it
where errors leave a command (`phrase`) and prints it in `main`. A class not in the table keeps
its own message (it names no flag, so it reads the same everywhere).
"""

from __future__ import annotations

from typing import Callable, Optional

from ..workflows import errors as E
from ..workflows.eval import errors as EV
from ..workflows.lengths import format_length

# message(error, command) -> str; `command` is the name of the command that raised (None outside one).
Message = Callable[[E.PbsError, Optional[str]], str]


def _input(e: E.PromptTooShort) -> str:
    return "the synthetic text" if e.source is None else f"--input {e.source}"


def _profile(e: E.ProfileFileError) -> str:
    text = Exception.__str__(e)
    if text.endswith("file not found"):
        return f"{text}; pass the path of an existing profile YAML, e.g. profiles/default.yaml"
    return f"{text}; fix the file (keys and allowed values: profiles/README.md) or pass another profile"


def _not_shardable(e: E.NotShardable, c: Optional[str]) -> str:
    if e.heads is None:
        return (f"{e.model}: transformers has no tensor-parallel plan for {e.arch}, so it cannot be split over "
                f"{e.world} processes; run `pbs {c or '...'}` without torchrun")
    counts = [n for n in e.valid if n > 1]
    fix = (f"use torchrun --nproc_per_node {' or '.join(map(str, counts))}" if counts
           else "run it without torchrun")
    return (f"{e.model}: its {e.heads} query heads and {e.kv_heads} key/value heads do not split evenly over "
            f"{e.world} processes; {fix}")


def _tp_device(e: E.TensorParallelDevice) -> str:
    if e.reason == "cpu_with_gpu":
        return ("--device cpu under torchrun needs the GPUs hidden (transformers shards onto the GPUs it finds); "
                "run CUDA_VISIBLE_DEVICES= torchrun ... or use --device cuda")
    return (f"torchrun started {e.local_world} processes on this machine but it has {e.gpus} GPU(s); "
            f"use --nproc_per_node {e.gpus} or fewer")


def _not_under_torchrun(e: E.NotUnderTorchrun, c: Optional[str]) -> str:
    if c == "tune":
        return (f"`pbs tune` does not run under torchrun ({e.world} processes): each trial times one GPU's "
                "attention of the whole model; to spread the trials, start one `pbs tune` per GPU "
                "(CUDA_VISIBLE_DEVICES=i) or machine, all with the same --storage and --study")
    if c == "analyze":
        return (f"`pbs analyze` does not run under torchrun ({e.world} processes): it reads every head of the "
                "whole model; run it in one process")
    return f"`pbs {c or '...'}` does not run under torchrun ({e.world} processes); run it in one process"


_BENCH_FLAGS = {"chunk": "--chunk", "lengths": "--lengths", "serving_only": "--serving-only",
                "captured": "--workload captured"}


def _bench_scope(e: E.TensorParallelBenchScope) -> str:
    fixes = ["add --e2e"] if "attention" in e.asked else []
    flags = [_BENCH_FLAGS[a] for a in e.asked if a in _BENCH_FLAGS]
    if flags:
        fixes.append(f"drop {', '.join(flags)} (they time one GPU's attention: run them without torchrun)")
    return (f"under torchrun ({e.world} processes) `pbs bench` times the sharded model's first token only; "
            + " and ".join(fixes))


MESSAGES: dict[type, Message] = {
    E.ProfileFileError: lambda e, c: _profile(e),
    E.CudaUnavailable: lambda e, c: "--device cuda was requested but no CUDA GPU is available; use --device cpu or auto",
    E.Bf16Unsupported: lambda e, c: "this GPU does not support bf16; use --dtype fp16",
    E.GpuRequired: lambda e, c: (
        "no CUDA GPU found: `pbs bench` times GPU kernels; run `pbs bench --device cpu` "
        f"for a correctness-only pass on small sizes (<= {e.cpu_max_len} tokens)"),
    E.OutOfMemoryAt: lambda e, c: f"out of GPU memory at --seq-len {e.seq_len}; use a shorter --seq-len or fewer --heads",
    E.LayerMissing: lambda e, c: (
        f"--layer {e.layer} does not exist; the model has {e.num_layers} layers: use --layer 0 to {e.num_layers - 1}"
        if c == "bench" else
        f"--layers: layer {e.layer} does not exist; the model has {e.num_layers} layers: use layers in "
        f"0-{e.num_layers - 1}"),
    E.LayerSpecInvalid: lambda e, c: f"--layers {e.detail}",
    E.SeqLenTooLong: lambda e, c: (
        f"--seq-len {e.seq_len} exceeds {e.model}'s max_position_embeddings {e.limit}; "
        f"use --seq-len {format_length(e.limit)} or less"),
    E.InputFileError: lambda e, c: f"--input {e.detail}",
    E.NoTokenizer: lambda e, c: (
        f"--input needs a tokenizer and {e.model} has none (no tokenizer files in {e.source}); "
        "drop --input to use synthetic tokens"),
    E.PromptTooShort: lambda e, c: (
        f"{_input(e)} has {e.tokens} tokens, fewer than --seq-len {e.seq_len}; pass a longer text, "
        "a smaller --seq-len, or drop --no-extend to repeat it"),
    E.WorkloadUnknown: lambda e, c: f"--workload {e.workload!r} is unknown; use synthetic, vertical or captured",
    E.HeadsNotMultiple: lambda e, c: (
        f"--heads {e.heads} is not a multiple of --kv-heads {e.kv_heads}, which grouped-query attention needs; "
        f"use e.g. --heads {-(-e.heads // e.kv_heads) * e.kv_heads} --kv-heads {e.kv_heads}"),
    E.SeqLenNotAboveSegment: lambda e, c: (
        f"--seq-len {e.seq_len} is not longer than segment_size {e.segment_size}: PBS would run dense "
        f"attention; use --seq-len {e.suggested} or more"),
    E.ProfileNotForModel: lambda e, c: (
        f"--profile {e.profile} sets layer {e.layer} but {e.model} has {e.num_layers} layers (0-{e.num_layers - 1}); "
        f"pass a profile tuned for this model (pbs tune {e.model} ... --out FILE) or drop --profile"),
    E.E2EUnavailable: lambda e, c: (
        f"--e2e needs pbs_kernels.integrations.hf, which cannot be imported here ({e.reason})"),
    E.TrialsTooFew: lambda e, c: "--trials must be at least 1",
    E.Interrupted: lambda e, c: (
        "interrupted; rerun the same command to resume (finished trials are kept in --storage)" if c == "tune"
        else "interrupted; rerun the command to start again"),
    E.TargetAboveBound: lambda e, c: (
        f"--target-speedup {e.target:g}x is above {e.bound:.1f}x, the most any setting could give at "
        f"{e.seq_len} tokens even computing no tiles (the {e.cost_model} cost model's fixed share for "
        f"selection, Amdahl's bound); use a --target-speedup below {e.bound:.1f}x"),
    E.TargetMissed: lambda e, c: (
        f"the tuned profile gives {e.speedup:.2f}x ({e.cost_model}) on held-out text, below the "
        f"--target-speedup {e.target:g}x, so it was not saved; rerun with --keep-best to save it (the trials are "
        "stored: no new ones run), or lower --target-speedup"),
    E.SeqLenTooShort: lambda e, c: f"--seq-len {e.seq_len} is too short to tune; use at least {e.minimum} tokens",
    E.TargetUnreachableError: lambda e, c: (
        f"target {e.target:g}x is out of reach: the fastest settings found give {e.best_speedup:.2f}x "
        f"({e.cost_model} attention speedup at {e.seq_len} tokens); lower --target-speedup, raise --trials, "
        "or tune at a longer --seq-len"),
    E.AccuracyUnreachableError: lambda e, c: (
        f"target {e.target:g}x is out of reach within --max-accuracy-drop {e.max_drop:g} (dense "
        f"{100 * e.dense_accuracy:.1f}% on held-out retrieval prompts at {e.seq_len} tokens): "
        f"{'the fastest profile within the drop' if e.within else 'the most accurate profile checked'} gives "
        f"{e.best_speedup:.2f}x ({e.cost_model}) at {100 * e.best_accuracy:.1f}%; lower --target-speedup "
        "or raise --max-accuracy-drop"),
    E.StorageInvalid: lambda e, c: (
        f"--storage {e.spec!r} is not a storage; use sqlite:///FILE.db, postgresql://USER@HOST/DB, "
        "mysql://..., journal:FILE or FILE.log"),
    E.StorageUnwritable: lambda e, c: (
        f"cannot write the storage file {e.path} ({e.reason}); pass a writable --storage"),
    E.StorageDriverMissing: lambda e, c: (
        f"--storage {e.label}: the database driver is missing ({e.reason}); install it, e.g. "
        "pip install psycopg2-binary for postgresql"),
    E.OutputUnwritable: lambda e, c: f"--out {e.path}: {e.reason}; pass an --out {e.kind} you can write to",
    E.StudyMismatchError: lambda e, c: (
        f"study {e.study} in the storage is not a pbs tune study (other objectives); pass another --study name"
        if e.key is None else
        f"study {e.study} was tuned with {e.key}={e.recorded!r}, this run has {e.key}={e.current!r}; "
        "pass another --study name (or the same options as before) to avoid mixing results"),
    E.NotShardable: _not_shardable,
    E.TensorParallelDevice: lambda e, c: _tp_device(e),
    E.NotUnderTorchrun: _not_under_torchrun,
    E.TensorParallelBenchScope: lambda e, c: _bench_scope(e),
    # eval (workflows/eval/errors.py)
    EV.UnknownTaskError: lambda e, c: (
        f"--tasks: {'no task given' if e.task is None else f'unknown task {e.task!r}'}; "
        f"choose from {', '.join(e.allowed)}"),
    EV.DepthError: lambda e, c: f"--depths: {e.depth:g} is outside [0, 1]; use fractions like 0,0.5,1",
    EV.LengthBeyondPositions: lambda e, c: (
        f"--seq-len {e.seq_len} plus {e.answer_tokens} answer tokens exceeds {e.model}'s "
        f"max_position_embeddings {e.limit}; use --seq-len {format_length(e.limit)} or less (prompts at the limit "
        "are shortened to leave room for the answer)"),
    EV.TaskNeedsEnglish: lambda e, c: (
        f"--tasks: task {e.task} is natural English text and this model reads only the demo record grammar; "
        "use niah_single or niah_multikey"),
    EV.LengthTooShortForTask: lambda e, c: (
        f"--seq-len {e.seq_len} is too short for task {e.task} (it needs at least {e.minimum} tokens); "
        "use a longer --seq-len"),
    EV.ProfileMismatchError: lambda e, c: (
        f"--profile sets layer {e.layer} but {e.model} has {e.num_layers} layers: it was made for "
        f"{e.profile_model or 'another model'}; pass a profile tuned for {e.model} (pbs tune)"
        if e.layer is not None else
        f"--profile was made for {e.profile_model}, not {e.model}; pass a profile tuned for {e.model} (pbs tune)"),
    EV.HaystackError: lambda e, c: f"--input {e.source}: {e.detail}",
}


def message(e: E.PbsError, command: Optional[str] = None) -> str:
    """The command-line wording of `e` (its own message for a class not in the table)."""
    if e.shown_as is not None:
        return e.shown_as
    for cls in type(e).__mro__:
        if cls in MESSAGES:
            return MESSAGES[cls](e, command)
    return Exception.__str__(e)


def phrase(e: E.PbsError, command: Optional[str] = None) -> E.PbsError:
    """`e` worded for the command line from now on (str(e) gives the table's message)."""
    e.shown_as = message(e, command)
    return e


def prompt_remarks(prompt, seq_len: int) -> tuple[Optional[str], Optional[str]]:
    """(warning, info) about a prompt (workflows.model.Prompt) in the command line's words: the
    text was repeated to reach --seq-len, or a longer --input was cut. None where there is none."""
    what = "the synthetic text" if prompt.source == "synthetic" else f"--input {prompt.source}"
    warning = info = None
    if prompt.repeats is not None:
        warning = (f"{what} has {prompt.source_tokens} tokens, fewer than --seq-len {seq_len}: repeated it "
                   f"{prompt.repeats:.1f} times to fill (pass --no-extend to refuse)")
    if prompt.truncated:
        info = f"{what} has {prompt.source_tokens} tokens; using the first {seq_len}"
    return warning, info
