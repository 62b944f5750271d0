"""The progress callback every workflow takes (the commands draw it as rich progress bars).

progress(desc, completed, total): `completed` is absolute (not an increment), so a workflow can
report the same step twice harmlessly; total None means unknown. One bar per distinct desc.
"""

from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Callable[[str, int, Optional[int]], None]


def no_progress(desc: str, completed: int, total: Optional[int] = None) -> None:
    """The progress callback for callers that want none (tests, Python callers)."""
