"""Which calls a selective checkpoint keeps the outputs of: the choices worth planning, exactly.

A selective checkpoint keeps its input and the outputs of some of its expensive calls (convolutions, matrix
products, attention); its recomputation takes those from the stash and runs everything else again. Keeping call
``c`` costs its output's bytes ``b_c`` from forward to backward and saves its forward compute ``t_c`` in the
recomputation, independently of what else is kept (every other call runs again either way). Choosing the calls is
a 0/1 knapsack; the planner needs it for every budget at once, so this returns its *Pareto frontier*: for each
amount of memory, the subset that saves the most compute, and no subset another beats in both. The chain planner
(``invfx.planner``) then picks one level per segment, jointly with every segment's mode, exactly.

The frontier is built call by call (each point extended or not, dominated points dropped), which is exact; its
size is at most the number of distinct byte sums, and in practice a handful per block (a ResNet block's two or
three convolutions, a transformer block's projections, attention and MLP). Where it has more than ``limit``
points, it is thinned to ``limit`` (the smallest, the largest, and points evenly spread in bytes between), and
the caller is told, so that the plan can say it chose among fewer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .planner import StashLevel

__all__ = ["LEVEL_LIMIT", "stash_frontier"]

#: The most stash levels a segment offers the planner (its options grow the planner's states linearly and its
#: transitions quadratically). A frontier with more points is thinned, and the plan says so.
LEVEL_LIMIT = 6
# Points the frontier may hold while it is built (each call at most doubles it before pruning).
_BUILD_LIMIT = 4096


def _value(level: StashLevel, by_seconds: bool) -> tuple[float, float]:
    return (level.seconds, level.flops) if by_seconds else (level.flops, level.seconds)


def _joined(a: StashLevel, b: StashLevel) -> StashLevel:
    return StashLevel(a.nbytes + b.nbytes, a.flops + b.flops, a.seconds + b.seconds, a.calls + b.calls)


def _pareto(points: Iterable[StashLevel], by_seconds: bool) -> list[StashLevel]:
    """The points no other beats: by ascending bytes, each saving strictly more than every smaller one."""
    ordered = sorted(points, key=lambda p: (p.nbytes, tuple(-v for v in _value(p, by_seconds)), p.calls))
    frontier: list[StashLevel] = []
    for point in ordered:
        if not frontier or _value(point, by_seconds) > _value(frontier[-1], by_seconds):
            if frontier and frontier[-1].nbytes == point.nbytes:
                frontier.pop()  # (same bytes, saves more: the earlier one is beaten)
            frontier.append(point)
    return frontier


def _thinned(frontier: list[StashLevel], limit: int) -> list[StashLevel]:
    """``limit`` points of ``frontier``: its first and last, and those nearest to even steps in bytes between."""
    if len(frontier) <= limit:
        return frontier
    if limit == 1:
        return frontier[-1:]
    low, high = frontier[0].nbytes, frontier[-1].nbytes
    chosen = {0, len(frontier) - 1}
    for k in range(1, limit - 1):
        target = low + (high - low) * k / (limit - 1)
        candidates = [i for i in range(len(frontier)) if i not in chosen]
        chosen.add(min(candidates, key=lambda i: abs(frontier[i].nbytes - target)))
    return [frontier[i] for i in sorted(chosen)]


def stash_frontier(choices: Sequence[Sequence[StashLevel]], by_seconds: bool,
                   limit: int = LEVEL_LIMIT) -> tuple[tuple[StashLevel, ...], bool]:
    """The stash levels worth planning, and whether they are the whole frontier (False: thinned).

    ``choices``: one list per independent part, of the alternatives it offers (a call: ``[its level]``; a
    segment of a group: its own levels); each part takes one alternative or nothing. ``by_seconds``: compare
    what levels save in measured time (else FLOPs). The empty choice (a plain checkpoint) is left out, as is
    anything that saves nothing. Levels come by ascending bytes, each saving more than the one before."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    frontier = [StashLevel(0, 0.0, 0.0, ())]
    whole = True
    for alternatives in choices:
        extended = list(frontier)
        for alternative in alternatives:
            extended += [_joined(point, alternative) for point in frontier]
        frontier = _pareto(extended, by_seconds)
        if len(frontier) > _BUILD_LIMIT:
            frontier, whole = _thinned(frontier, _BUILD_LIMIT), False
    useful = [point for point in frontier if _value(point, by_seconds) > (0.0, 0.0)]  # (not the empty choice)
    return tuple(_thinned(useful, limit)), whole and len(useful) <= limit
