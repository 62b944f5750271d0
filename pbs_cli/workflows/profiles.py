"""Profiles as every command reads them: one loader, one translation of a bad file.

    profile = load_profile(path)      # ProfileFileError (one line, exit 1) for a missing or bad file
    profile = load_profile(None)      # the method defaults (PbsProfile.default())

`file_error` is the translation itself (pbs_kernels' ProfileError -> the toolkit's
ProfileFileError); `load_profile` applies it, and app.main's backstop applies it to a
ProfileError raised anywhere else.

pbs_kernels is imported inside the function: `pbs --help` must not pay for torch.
"""

from __future__ import annotations

import os

from .errors import ProfileFileError

__all__ = ["file_error", "load_profile"]


def file_error(e: Exception) -> ProfileFileError:
    """pbs_kernels' ProfileError `e` as the toolkit's error (its message already names the file
    and the field; commands._messages adds the fix)."""
    return ProfileFileError(str(e))


def load_profile(path: str | os.PathLike | None):
    """The PbsProfile at `path` (checked on load), or the defaults when `path` is None. A missing
    or malformed file raises ProfileFileError naming the file and the field."""
    from pbs_kernels.profile import PbsProfile, ProfileError

    if path is None:
        return PbsProfile.default()
    try:
        return PbsProfile.load(path)
    except ProfileError as e:
        raise file_error(e) from e
