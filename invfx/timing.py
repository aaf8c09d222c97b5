"""Step times compared fairly: several contenders timed in one process, interleaved round by round with the
order rotated (so none always runs first, on a warm or cold machine), medians reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["interleaved_medians", "interleaved_times"]


def interleaved_medians(work: dict[str, Callable[[], object]], repeats: int,
                        prepare: Callable[[str], object] | None = None) -> dict[str, float]:
    """Median seconds of each ``work[name]()`` over ``repeats`` rounds (after one warm-up round);
    ``prepare(name)`` runs untimed before each call (setting a mode, zeroing gradients)."""
    return {name: statistics.median(values) for name, values in interleaved_times(work, repeats, prepare).items()}


def interleaved_times(work: dict[str, Callable[[], object]], repeats: int,
                      prepare: Callable[[str], object] | None = None) -> dict[str, list[float]]:
    """Seconds of each ``work[name]()`` in each of ``repeats`` rounds (after one warm-up round), as
    :func:`interleaved_medians` times them: ``times[a][k] / times[b][k]`` compares two contenders within round
    ``k``, where the machine's speed was the same for both."""
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
    return times
