"""`pbs profile show FILE` and `pbs profile validate FILE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..workflows.profiles import load_profile
from ._options import FormatOpt
from ._output import Output

FileArg = Annotated[Path, typer.Argument(metavar="FILE", help="A PBS profile YAML.", show_default=False)]


def show(file: FileArg, format: FormatOpt = "table") -> None:
    """Show a profile: its defaults, per-layer overrides and metrics.

    Example: pbs profile show profiles/default.yaml --format json
    """
    profile = load_profile(file)
    out = Output(format)
    if out.json:
        out.emit_json(profile.to_dict())
        return
    tuned = ", ".join(f"{k}={v}" for k, v in profile.tuned_for.items() if v is not None) or "-"
    out.info(f"{file}  model: {profile.model or '-'}  created: {profile.created or '-'}  tuned for: {tuned}")
    defaults = profile.to_dict()["defaults"]
    out.table("defaults", ["setting", "value"], defaults.items())
    if profile.layers:
        # Only the fields some layer overrides: all seven would not fit 80 columns and cut headers.
        fields = [f for f in defaults if any(f in o for o in profile.layers.values())]
        rows = [[i, *(profile.layers[i].get(f) for f in fields)] for i in sorted(profile.layers)]
        out.table("layer overrides (- = default)", ["layer", *fields], rows)
        for i in sorted(profile.layers):
            if profile.reason(i):  # free text: a line, not a column that would not fit
                out.info(f"layer {i}: {profile.reason(i)}")
    else:
        out.info("no per-layer overrides: every layer uses the defaults")
    if profile.metrics:
        out.table("metrics", ["metric", "value"], profile.metrics.items())
    else:
        out.info("no metrics recorded")


def validate(file: FileArg, format: FormatOpt = "table") -> None:
    """Check a profile; print `ok: FILE` (exit 0) or the problem in one line (exit 1).

    With --format json, a valid profile prints {"ok": true, "path": ..., "model": ...,
    "layers": [...]} on stdout; an invalid one prints nothing there and the error line on
    stderr (exit 1), as every command does.

    Example: pbs profile validate profiles/llama8b.yaml
    """
    profile = load_profile(file)
    out = Output(format)
    if out.json:
        out.emit_json({"ok": True, "path": str(file), "model": profile.model, "layers": sorted(profile.layers)})
    else:
        out.info(f"ok: {file}")
