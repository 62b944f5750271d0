"""`--help` of every command as a new user sees it in an 80-column terminal: nothing cut, no
placeholder for flags, every default whole."""

import re

import pytest
from typer.testing import CliRunner

from pbs_cli.app import app

COMMANDS = [[], ["analyze"], ["tune"], ["bench"], ["eval"], ["profile"], ["profile", "show"], ["profile", "validate"]]


def _help(args: list[str]) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    return r.stdout


def _listed(text: str) -> list[str]:
    """Command names of the help's 'Commands:' section."""
    section = text.split("Commands:", 1)[1] if "Commands:" in text else ""
    return [m.group(1) for m in re.finditer(r"^  (\S+)  ", section, re.M)]


def test_every_command_is_covered():
    assert _listed(_help([])) == ["analyze", "tune", "bench", "eval", "profile"]
    assert _listed(_help(["profile"])) == ["show", "validate"]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "pbs")
def test_help_fits_80_columns_uncut(args):
    text = _help(args)
    for line in text.splitlines():
        assert len(line) <= 80, line
        assert "…" not in line, line
        if not line.startswith("Usage:"):  # [ARGS]... is usage syntax, not a cut
            assert not line.rstrip().endswith("..."), line  # a command's description cut short
    assert "<bool>" not in text
    flat = " ".join(text.split())
    for default in re.findall(r"\[default: ([^\]]*)\]", flat):
        assert not re.search(r"\w- \w", default), f"default broken across lines: {default}"


@pytest.mark.parametrize("args, default", [
    (["analyze"], "pbs-out/analyze"),
    (["bench"], "pbs-out/bench"),
    (["bench"], "cudnn,flash,efficient,flex,noperm"),
    (["tune"], "pbs-out/<model>-<len>.yaml"),
    (["tune"], "32k on a GPU, 8k on the CPU"),
    (["eval"], "pbs-out/eval"),
    (["eval"], "2 on the CPU, 10 on a GPU"),
])
def test_defaults_show_whole(args, default):
    assert default in " ".join(_help(args).split())
