"""Token counts as people write them (the inverse of `pbs_cli.commands._options.parse_length`)."""

from __future__ import annotations


def format_length(n: int) -> str:
    """8192 -> '8k', 1048576 -> '1m', 1000 -> '1000': k = 1024, m = 1024**2, exact only."""
    if n > 0 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}m"
    if n > 0 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)
