"""Profiles as every command reads them: one loader, one translation of a bad file.

    profile = load_profile(path)      # ProfileFileError (one line, exit 1) for a missing or bad file
    profile = load_profile(None)      # the method defaults (PbsProfile.default())

pbs_kernels is imported inside the function: `pbs --help` must not pay for torch.
"""

from __future__ import annotations

import os

from .errors import ProfileFileError

__all__ = ["load_profile"]


def load_profile(path: str | os.PathLike | None):
    """The PbsProfile at `path` (checked on load), or the defaults when `path` is None. A missing
    or malformed file raises ProfileFileError naming the file and the field."""
    from pbs_kernels.profile import PbsProfile, ProfileError

    if path is None:
        return PbsProfile.default()
    try:
        return PbsProfile.load(path)
    except ProfileError as e:
        raise ProfileFileError(str(e)) from e
