"""Step times compared fairly: several contenders timed in one process, interleaved round by round with the
order rotated (so none always runs first, on a warm or cold machine), medians reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["interleaved_medians"]


def interleaved_medians(work: dict[str, Callable[[], object]], repeats: int,
                        prepare: Callable[[str], object] | None = None) -> dict[str, float]:
    """Median seconds of each ``work[name]()`` over ``repeats`` rounds (after one warm-up round);
    ``prepare(name)`` runs untimed before each call (setting a mode, zeroing gradients)."""
    names = list(work)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats + 1):  # round 0 is a warm-up
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if prepare is not None:
                prepare(name)
            start = time.perf_counter()
            work[name]()
            elapsed = time.perf_counter() - start
            if round_:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}
