"""How reports write sizes and operation counts (the plan, errors, the planner's messages)."""

from __future__ import annotations

__all__ = ["format_bytes", "format_flops"]


def format_bytes(n: float, exact: bool = False) -> str:
    """``8.0 KiB``, ``512 B``: binary units, one decimal above bytes; ``exact`` adds the bytes to a rounded figure
    (``8.0 KiB (8192 B)``)."""
    if exact and abs(n) >= 1024:
        return f"{format_bytes(n)} ({n} B)"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_flops(n: float) -> str:
    """``75.0 K``, ``512``: decimal units, one decimal above ones."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
