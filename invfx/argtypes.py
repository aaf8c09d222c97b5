"""argparse types and the report writer shared by ``python -m invfx`` and the benchmark scripts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["positive", "even", "depths", "apply_profile", "write_report"]


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def even(text: str) -> int:
    value = positive(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"expected an even width (the coupling splits it in two), got {value}")
    return value


def depths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"depths must be positive integers, got {text!r}")
    return tuple(sorted(set(values)))


def apply_profile(args: argparse.Namespace, profile: dict) -> argparse.Namespace:
    """Fill the options left unset (None) from a size profile (the defaults, or --quick's); explicit ones win."""
    for name, value in profile.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def write_report(lines: list[str], output: Path, failures: list[str]) -> int:
    """Print a benchmark's markdown report, write it to ``output``, say each failure on stderr; the exit status
    (1 if anything failed)."""
    text = "\n".join(lines)
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    print(f"written to {output}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0
