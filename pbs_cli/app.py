"""The `pbs` command: registers the commands and holds the single error boundary (`main`).

Command modules import torch and friends inside their bodies, so `pbs --help` stays instant.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Callable, Optional

import typer

from .commands import analyze, bench, eval, profile, tune
from .commands._messages import message, phrase
from .workflows.errors import Interrupted, PbsError


def _face(name: str, fn: Callable) -> Callable:
    """`fn` as the command `name`: a domain error leaving it is worded for the command line
    (commands._messages), so every caller of the app (main, CliRunner) sees the flags."""

    @functools.wraps(fn)
    def command(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PbsError as e:
            phrase(e, name)
            raise
        except KeyboardInterrupt:
            # Ctrl-C: one line and exit 130, not the traceback of wherever the work was.
            raise phrase(Interrupted(name), name) from None

    return command


def _help_keeps_words_whole() -> None:
    """Help at 80 columns must not break a flag or a word at its hyphen ('--block-' / 'size',
    'density-' / 'based'): Click wraps with textwrap's break_on_hyphens. Typer exposes no
    setting for it, so the wrapper class Click uses (in Typer's vendored copy since 0.26, or
    Click itself before) gets that default turned off; if neither is found, help just wraps as
    before. Long defaults are shown with spaces (eval's --tasks) so no word is cut either."""
    import importlib

    for name in ("typer._click._textwrap", "click._textwrap"):
        try:
            cls = importlib.import_module(name).TextWrapper
        except (ImportError, AttributeError):
            continue
        if getattr(cls, "_pbs_whole_words", False):
            continue
        init = cls.__init__

        def __init__(self, *args, _init=init, **kwargs):
            kwargs.setdefault("break_on_hyphens", False)
            _init(self, *args, **kwargs)

        cls.__init__ = __init__
        cls._pbs_whole_words = True


_help_keeps_words_whole()

app = typer.Typer(
    name="pbs",
    help="Permuted Block-Sparse attention for long-prompt prefill: analyze, tune, bench, apply.",
    no_args_is_help=True,
    add_completion=False,
    # Click's plain help formatter: it re-wraps docstring paragraphs and option help to the
    # terminal (COLUMNS) and never cuts a default short; Typer 0.29's rich panels kept the
    # docstrings' line breaks (ragged at 80 columns), cut defaults with '…' and showed flags
    # as `<bool>`.
    rich_markup_mode=None,
    # Plain tracebacks under PBS_DEBUG=1: easy to paste into an issue, never dumps tensor locals.
    pretty_exceptions_enable=False,
)
app.command("analyze", short_help="How sparse a model's attention is, with and without permutation.")(_face("analyze", analyze.command))
app.command("tune", short_help="Tune per-layer PBS settings to a target speedup; write a profile.")(_face("tune", tune.command))
app.command("bench", short_help="Time and check PBS attention against dense attention.")(_face("bench", bench.command))
app.command("eval", short_help="Retrieval accuracy on long prompts, dense and with a profile.")(_face("eval", eval.command))

profile_app = typer.Typer(help="Inspect and check PBS profile YAML files.", no_args_is_help=True,
                          rich_markup_mode=None)
profile_app.command("show")(_face("profile show", profile.show))
profile_app.command("validate", short_help="Check a profile; print ok or the problem in one line.")(_face("profile validate", profile.validate))
app.add_typer(profile_app, name="profile")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"pbs {version('pbs')}")
        except PackageNotFoundError:
            typer.echo("pbs (not installed; run `pip install -e .`)")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Permuted Block-Sparse attention for long-prompt prefill: analyze, tune, bench, apply."""


def _user_message(e: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(e, PbsError):
        return message(e)
    # A backstop, not a second translation: commands read profile files through
    # workflows.profiles.load_profile, which raises ProfileFileError. A raw ProfileError can still
    # come from a profile built in code and checked later (tune's result.profile.validate(), a
    # LayerConfig inside apply_profile) or from a path that reads a file with PbsProfile.load;
    # it gets the same words through the same function. Checked only if its module was loaded:
    # importing pbs_kernels here would pull torch into `pbs --help`; if it was raised, it is loaded.
    kernels_profile = sys.modules.get("pbs_kernels.profile")
    if kernels_profile is not None and isinstance(e, kernels_profile.ProfileError):
        from .workflows.profiles import file_error

        return message(file_error(e))
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of `pbs`: runs the app; expected failures print `error: ...` and exit 1.

    Typer's standalone mode still handles --help and bad option values (exit 2); everything it
    does not catch arrives here.
    """
    try:
        app(args=argv, prog_name="pbs")
    except SystemExit as done:  # typer's standalone mode ends every run this way
        if done.code in (0, None):
            from .workflows.distributed import finish

            finish()  # under torchrun: leave the process group together
        raise
    except Exception as e:
        message = _user_message(e)
        if message is None or os.environ.get("PBS_DEBUG", "") not in ("", "0"):
            raise
        from .workflows.distributed import ranks

        # Under torchrun every rank fails: checks of the user's input fail alike on each, a device
        # may fail on one. Each says so (rank 0 first, unmarked); the hint is said once.
        rank = ranks().rank
        prefix = f"rank {rank}: " if rank else ""
        typer.echo(f"{prefix}error: {' '.join(message.splitlines())}", err=True)
        if not rank and getattr(e, "debug_hint", True):
            typer.echo("(set PBS_DEBUG=1 for the traceback)", err=True)
        raise SystemExit(getattr(e, "exit_code", 1)) from None
