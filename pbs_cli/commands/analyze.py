"""`pbs analyze`: how sparse a model's attention is, with and without PBS's permutation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from pbs_kernels.limits import BLOCK_SIZES, ESTIMATORS, THRESHOLD_MASS

from ..workflows.errors import DeviceError
from ._options import DeviceOpt, DtypeOpt, FormatOpt, ModelArg, SeqLenOpt, parse_fraction

DEFAULT_OUT = Path("pbs-out/analyze")


def _layer_list(value: Optional[str]) -> Optional[str]:
    """--layers must parse (exit 2 otherwise); whether the layers exist is known after the load."""
    from ..workflows.analyze import parse_layers
    from ..workflows.errors import LayerSpecInvalid

    try:
        parse_layers(value, 1 << 30)
    except LayerSpecInvalid as e:
        raise typer.BadParameter(e.detail) from None
    return value


def command(
    model: ModelArg = None,
    seq_len: SeqLenOpt = 8192,
    input: Annotated[Optional[Path], typer.Option("--input", metavar="FILE", help="Text file used as the prompt.", show_default="a built-in synthetic text with long-range lookups")] = None,
    block_size: Annotated[int, typer.Option("--block-size", help="Tile edge: 16, 32, 64 or 128.")] = 128,
    segment_size: Annotated[int, typer.Option("--segment-size", help="Permutation window, a multiple of the block size.")] = 256,
    coverage: Annotated[float, typer.Option("--coverage", parser=parse_fraction, help="Attention mass the oracle must cover, in (0, 1].")] = 0.9,
    threshold: Annotated[float, typer.Option("--threshold", parser=parse_fraction, help="PBS selection threshold to evaluate, in (0, 1].")] = 0.9,
    estimator: Annotated[str, typer.Option("--estimator", help="How PBS's selection estimates a tile's mass: mean or top (a block's top keys too).")] = "mean",
    threshold_mass: Annotated[str, typer.Option("--threshold-mass", help="What --threshold is a share of: earlier (earlier segments' mass), total (the whole row's) or head (the earlier mass of all the head's rows together).")] = "earlier",
    vertical_keys: Annotated[int, typer.Option("--vertical-keys", metavar="N", help="PBS also attends to the first N slots of each earlier segment whose first block it skips; recall and work count them. 0 to --block-size.")] = 0,
    layers: Annotated[Optional[str], typer.Option("--layers", metavar="LIST", callback=_layer_list, help="Layers to analyse, e.g. 0,2,5-7.", show_default="all")] = None,
    no_extend: Annotated[bool, typer.Option("--no-extend", help="Fail if the input is shorter than --seq-len instead of repeating it.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Folder for report.json and the PNGs.", show_default=str(DEFAULT_OUT))] = None,
    format: FormatOpt = "table",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Measure how sparse a model's attention is, with and without permutation.

    One prefill of --seq-len tokens; per layer and head: oracle density (key blocks covering --coverage of the attention, original and PBS-permuted key order), PBS's own selection at --threshold (density, recall, and its selection efficiency: the tiles an oracle needs for the same recall over the tiles PBS computes), sink and local mass, and whether permuting helps. Writes report.json and PNG heatmaps to --out. No MODEL: the embedded demo model. An input shorter than --seq-len is repeated to fill it.

    Example: pbs analyze meta-llama/Llama-3.1-8B --seq-len 32k --layers 0-3
    """
    if block_size not in BLOCK_SIZES:
        raise typer.BadParameter(f"{block_size} is not allowed; use one of {', '.join(map(str, BLOCK_SIZES))}", param_hint="'--block-size'")
    if segment_size <= 0 or segment_size % block_size:
        raise typer.BadParameter(f"{segment_size} is not a positive multiple of --block-size {block_size}",
                                 param_hint="'--segment-size'")
    if estimator not in ESTIMATORS:
        raise typer.BadParameter(f"{estimator!r} is not one of {', '.join(ESTIMATORS)}", param_hint="'--estimator'")
    if threshold_mass not in THRESHOLD_MASS:
        raise typer.BadParameter(f"{threshold_mass!r} is not one of {', '.join(THRESHOLD_MASS)}",
                                 param_hint="'--threshold-mass'")
    if not 0 <= vertical_keys <= block_size:
        raise typer.BadParameter(f"{vertical_keys} is not from 0 to --block-size {block_size}",
                                 param_hint="'--vertical-keys'")
    from ..workflows.outputs import check_out_dir, save_files

    out_dir = check_out_dir(out if out is not None else DEFAULT_OUT)  # before minutes of work

    # Heavy imports here, not at module level: `pbs --help` must stay instant.
    import torch

    from ..workflows.model import build_prompt, check_seq_len, load_model, read_text_input
    from ._messages import prompt_remarks
    from ._output import Output, to_jsonable
    from pbs_kernels.settings import PbsSettings

    from ..workflows.analyze import parse_layers, render_pictures, run_analysis

    if input is not None:
        read_text_input(input)  # a missing, empty-of-text or binary file: one line before the model loads
    output = Output(format)
    try:
        loaded = load_model(model, device=device, dtype=dtype)
        check_seq_len(loaded, seq_len)
        chosen = parse_layers(layers, loaded.num_layers) if loaded.num_layers else None
        prompt = build_prompt(loaded, seq_len, input, extend=not no_extend)
        warning, remark = prompt_remarks(prompt, seq_len)
        if warning:
            output.warn(warning)
        if remark:
            output.info(remark)
        output.info(f"analysing {loaded.name} on {loaded.device.type} ({str(loaded.dtype).replace('torch.', '')}), "
                    f"{seq_len} tokens of {'synthetic text' if input is None else input}, block {block_size}, "
                    f"segment {segment_size}" + (f", vertical keys {vertical_keys}" if vertical_keys else ""))
        with output.progress() as report_progress:
            settings = PbsSettings(block_size=block_size, segment_size=segment_size, threshold=threshold,
                                   estimator=estimator, threshold_mass=threshold_mass, vertical_keys=vertical_keys)
            report = run_analysis(loaded.model, prompt.input_ids, settings, layers=chosen, coverage=coverage,
                                  model_name=loaded.name, progress=report_progress)
    except torch.cuda.OutOfMemoryError:
        raise DeviceError(
            f"CUDA out of memory analysing {seq_len} tokens of {model or 'the demo model'}; "
            "try a smaller --seq-len or fewer --layers (e.g. --layers 0-3)"
        ) from None
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):  # the CPU allocator's out-of-memory message
            raise
        raise DeviceError(
            f"out of memory analysing {seq_len} tokens of {model or 'the demo model'} on the CPU; "
            "try a smaller --seq-len or fewer --layers (e.g. --layers 0-3)"
        ) from None

    report.input = prompt.source
    if warning:
        report.notes.append(warning)
    pictures = render_pictures(report)
    report.files = {"report": str(out_dir / "report.json"), "pictures": [str(out_dir / p) for p in pictures]}
    report_json = json.dumps(to_jsonable(report.to_dict()), indent=2, allow_nan=False) + "\n"
    saved = save_files(out_dir, {**pictures, "report.json": report_json}, label="pbs-analyze")
    if saved.failure is not None:  # the files are elsewhere: say so in the printed results too
        report.files = {"report": str(saved.paths[-1]) if saved.paths else None,
                        "pictures": [str(p) for p in saved.paths[:-1]]}

    if output.json:
        output.emit_json(report.to_dict())
    else:
        _print_tables(output, report)
    saved.raise_failure()


def _pbs_cell(lr) -> str:
    """How the model runs the layer with PBS: dense (and why), inside its window, or yes."""
    if lr.pbs_fallback:
        return f"dense: {lr.pbs_fallback}"
    if lr.attention == "windowed":
        return f"window {lr.sliding_window}"
    return "yes"


def _print_tables(output, report) -> None:
    # Short headers: the table must fit an 80-column terminal; the legend line explains them.
    columns = ["layer", "oracle", "oracle perm", "PBS dens", "recall", "sel eff", "sink", "local", "perm +/=/-", "PBS"]

    def row(lr):
        return [lr.layer, lr.oracle_density, lr.oracle_density_perm, lr.pbs_density, lr.pbs_recall,
                lr.selection_efficiency, lr.sink_mass, lr.local_mass, f"{lr.helps}/{lr.neutral}/{lr.hurts}",
                _pbs_cell(lr)]

    ranked = report.ranked_layers()
    title = (f"{report.model}: {report.seq_len} tokens, coverage {report.coverage:g}, "
             f"PBS threshold {report.threshold:g}, block {report.block_size}, segment {report.segment_size}"
             + (f", vertical keys {report.vertical_keys}" if report.vertical_keys else ""))
    if len(ranked) <= 12:
        output.table(title + " (sparsest layers first)", columns, [row(lr) for lr in ranked])
    else:
        output.table(title + ": 5 sparsest layers", columns, [row(lr) for lr in ranked[:5]])
        output.table("5 densest layers", columns, [row(lr) for lr in ranked[-5:][::-1]])
    output.info(
        f"oracle / oracle perm: fewest key blocks holding {report.coverage:g} of each query block's attention "
        "per causal tile, keys in original / PBS-permuted order; PBS dens, recall: PBS's own selection; sel eff: tiles an oracle needs for PBS's recall / tiles PBS computes; sink: "
        "mass on the first block; local: on the own and previous block; perm +/=/-: heads where permuting "
        "helps / is neutral / hurts; PBS: whether PBS can run on the layer (window W: the model runs it "
        "with a W-token sliding window, and every figure is inside it)"
    )
    s = report.summary
    output.info(
        f"mean over {s['heads_analyzed']} heads: oracle density {s['oracle_density']:.3f} -> "
        f"{s['oracle_density_perm']:.3f} with permutation; PBS at threshold {report.threshold:g}: density "
        f"{s['pbs_density']:.3f}, recall {s['pbs_recall']:.3f}, selection efficiency {s['selection_efficiency']:.3f} "
        f"(estimator {s['estimator']}, threshold over {s['threshold_mass']} mass"
        + (f"; {s['vertical_keys']} vertical keys: recall counts them, work +{s['pbs_vertical_density']:.3f}"
           if s["vertical_keys"] else "") + ")"
    )
    output.info(f"permutation helps {s['heads_helps']} heads, is neutral for {s['heads_neutral']}, "
                f"hurts {s['heads_hurts']} (margin {report.verdict_margin:.0%} of the oracle density)")
    for key, label in (("most_sparse_head", "sparsest head"), ("least_sparse_head", "densest head")):
        ref = s.get(key)
        if ref:
            output.info(f"{label}: layer {ref['layer']} head {ref['head']}, oracle density "
                        f"{ref['oracle_density']:.3f} -> {ref['oracle_density_perm']:.3f} permuted")
    if report.peak_gpu_memory_gib is not None:
        output.info(f"peak GPU memory: {report.peak_gpu_memory_gib:.1f} GiB")
    if report.files.get("report"):
        output.info(f"wrote {report.files['report']} and {len(report.files['pictures'])} pictures in "
                    f"{Path(report.files['report']).parent} ({report.elapsed_s:.1f} s)")
