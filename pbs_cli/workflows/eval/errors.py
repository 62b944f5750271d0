"""Domain errors of the eval workflow. They name the problem, never a CLI flag: the command
layer maps each class to a one-line message that names the option to change."""

from __future__ import annotations


class EvalError(ValueError):
    """Base of the eval workflow's expected failures (one line, no traceback)."""

    exit_code = 1


class UnknownTaskError(EvalError):
    """A task name that is not one of TASKS."""


class LengthError(EvalError):
    """A prompt length the model cannot take, or one too short for the task."""


class ProfileMismatchError(EvalError):
    """A profile made for another model (layers it does not have, or another model name)."""


class HaystackError(EvalError):
    """A haystack text that is empty, unreadable or gives no tokens."""


class DepthError(EvalError):
    """A needle depth outside [0, 1]."""
