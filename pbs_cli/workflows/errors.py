"""Errors the user can fix. Each carries a one-line message: what is wrong and how to fix it.

`pbs_cli.app.main` is the only place that prints them (exit 1); commands and workflows raise.
"""

from __future__ import annotations


class PbsError(Exception):
    """Base of every expected failure; the message is one line, shown without a traceback."""

    exit_code = 1


class UsageError(PbsError):
    """Options that parse but cannot work together (e.g. --profile with --dense)."""


class ModelError(PbsError):
    """A model id or folder that cannot be loaded or is not a supported architecture."""


class DeviceError(PbsError):
    """The requested device or dtype is unavailable (no CUDA, bf16 on an old card...)."""


class ProfileFileError(PbsError):
    """A profile YAML that is missing or malformed (wraps pbs_kernels.profile.ProfileError)."""
