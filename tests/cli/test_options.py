"""Length / speedup / fraction parsing, directly and through the CLI (bad values exit 2)."""

import json
from typing import Optional

import pytest
import typer
from typer.testing import CliRunner

from pbs_cli.commands._options import (
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    ModelArg,
    ProfileOpt,
    SeqLenOpt,
    SeqLensOpt,
    SpeedupOpt,
    parse_fraction,
    parse_length,
    parse_lengths,
    parse_speedup,
)
from pbs_cli.app import app

runner = CliRunner()


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("8192", 8192),
        ("8k", 8192),
        ("8K", 8192),
        ("128k", 131072),
        ("1m", 1048576),
        ("1M", 1048576),
        ("0.5k", 512),
        (" 16k ", 16384),
        ("1", 1),
    ],
)
def test_parse_length(text, tokens):
    assert parse_length(text) == tokens


@pytest.mark.parametrize("text", ["", "k", "8kb", "8 k", "-8k", "0", "0k", "0.3k", "1.5", "abc", "1e3", "8g", "8k8"])
def test_parse_length_rejects(text):
    with pytest.raises(typer.BadParameter) as e:
        parse_length(text)
    message = str(e.value)
    assert repr(text) in message and "8k" in message and "1m" in message


def test_parse_lengths():
    assert parse_lengths("8k,32k,128k") == [8192, 32768, 131072]
    assert parse_lengths("8k, 8192 ,1m") == [8192, 1048576]  # duplicates dropped, order kept
    assert parse_lengths("4k") == [4096]
    for bad in ("", ",", "8k,x"):
        with pytest.raises(typer.BadParameter):
            parse_lengths(bad)


@pytest.mark.parametrize("text, value", [("2", 2.0), ("2x", 2.0), ("2.5X", 2.5), ("1", 1.0), ("1.0x", 1.0), (" 3x ", 3.0)])
def test_parse_speedup(text, value):
    assert parse_speedup(text) == value


@pytest.mark.parametrize("text", ["0", "-2", "0.5x", "x", "", "abc", "2xx", "nan", "inf", "x2"])
def test_parse_speedup_rejects(text):
    with pytest.raises(typer.BadParameter) as e:
        parse_speedup(text)
    assert repr(text) in str(e.value) and "2.5X" in str(e.value)


def test_parse_fraction():
    assert parse_fraction("0.9") == 0.9 and parse_fraction("1") == 1.0
    for bad in ("0", "1.5", "-0.1", "nan", "most"):
        with pytest.raises(typer.BadParameter):
            parse_fraction(bad)


# A probe command built from the shared aliases: prints what the parsers produced.
probe = typer.Typer()


@probe.command("probe")
def _probe(
    model: ModelArg = None,
    seq_len: SeqLenOpt = 8192,
    target_speedup: SpeedupOpt = 2.0,
    format: FormatOpt = "table",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    profile: ProfileOpt = None,
    extra: Optional[int] = None,
) -> None:
    print(json.dumps({
        "model": model, "seq_len": seq_len, "target_speedup": target_speedup,
        "format": format.value, "device": device.value, "dtype": dtype.value,
        "profile": None if profile is None else str(profile),
    }))


@probe.command("lengths")
def _lengths(seq_len: SeqLensOpt = "8k,16k") -> None:
    print(json.dumps(list(seq_len)))


def _probe_run(*args):
    return runner.invoke(probe, ["probe", *args])


def test_aliases_parse_through_typer():
    r = _probe_run()
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {
        "model": None, "seq_len": 8192, "target_speedup": 2.0,
        "format": "table", "device": "auto", "dtype": "auto", "profile": None,
    }
    r = runner.invoke(probe, ["lengths"])
    assert r.exit_code == 0 and json.loads(r.stdout) == [8192, 16384], r.output
    r = runner.invoke(probe, ["lengths", "--seq-len", "128k,1m"])
    assert r.exit_code == 0 and json.loads(r.stdout) == [131072, 1048576], r.output
    r = _probe_run("org/model", "--seq-len", "32K", "--target-speedup", "2.5X", "--format", "json", "--device", "cpu", "--dtype", "bf16", "-p", "x.yaml")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["model"] == "org/model" and got["seq_len"] == 32768 and got["target_speedup"] == 2.5 and got["format"] == "json"
    assert got["device"] == "cpu" and got["dtype"] == "bf16" and got["profile"] == "x.yaml"


@pytest.mark.parametrize(
    "args",
    [
        ["--format", "xml"],
        ["--device", "tpu"],
        ["--dtype", "int8"],
    ],
)
def test_alias_choices_exit_2(args):
    r = _probe_run(*args)
    assert r.exit_code == 2, r.output


# Through the real app: a bad value must stop at parsing (exit 2), before the command body runs.
@pytest.mark.parametrize(
    "args, shown",
    [
        (["bench", "--seq-len", "8q"], "'8q'"),
        (["bench", "--seq-len", "8k,abc"], "'abc'"),
        (["analyze", "--seq-len", "-1k"], "'-1k'"),
        (["analyze", "--coverage", "1.5"], "'1.5'"),
        (["tune", "--target-speedup", "0"], "'0'"),
        (["tune", "--target-speedup", "fast"], "'fast'"),
        (["tune", "--target-speedup", "-2x"], "'-2x'"),
        (["tune", "--target-speedup", "2", "--seq-len", "1.3k"], "'1.3k'"),
    ],
)
def test_cli_bad_values_exit_2(args, shown):
    r = runner.invoke(app, args, prog_name="pbs")
    assert r.exit_code == 2, r.output
    assert shown in " ".join(r.stderr.split()) and r.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "--seq-len", "8k,32k,128k"],
        # 1m is past the demo model's 32K positions: parsed fine, then a clean exit 1.
        ["analyze", "--seq-len", "1M", "--coverage", "0.95"],
        ["tune", "--target-speedup", "2.5X", "--seq-len", "1m"],
    ],
)
def test_cli_good_values_reach_the_command(args):
    # Parsing passed, so no exit 2 (the commands then stop early on purpose: no GPU, too long).
    r = runner.invoke(app, args, prog_name="pbs")
    assert r.exit_code != 2, r.output
