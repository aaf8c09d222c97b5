"""Checkpointing several segments as one: coarser chains for lower budgets.

A checkpointed segment keeps its input; ``n`` checkpointed blocks keep ``n`` inputs. ``checkpoint_sequential``
with ``k`` segments keeps ``k`` inputs, each segment recomputing ``n / k`` blocks at once in backward, which is
how it goes below what checkpointing every block alone reaches (ResNet depth 16: 0.29 of plain's peak against
0.36). Here the chain of segments is also planned coarsened: consecutive segments taken ``g`` at a time, each
group one segment of the coarse chain, kept, checkpointed or selective as a whole (never invertible: a group's
inner boundaries are not freed by an inverse). Planning picks the granularity whose plan is best (the least
peak, or the least compute within a budget; ties to the finer one).

A group's costs are derived from its members' measured costs, as the memory model needs them: its saved bytes
are theirs and the inner boundaries a plain run saves; its backward holds all of that at once (a checkpointed
group recomputes every member before differentiating any). Calibration measures the module written from the
plan, as for any plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..modes import Mode
from ..planner import SegmentCost
from ..stash_levels import stash_frontier

__all__ = ["GROUPABLE_MODES", "coarsen", "group_cost"]

#: the modes a group of several segments may take
GROUPABLE_MODES = frozenset({Mode.KEEP, Mode.CHECKPOINT, Mode.SELECTIVE})


def group_cost(members: Sequence[SegmentCost]) -> SegmentCost:
    """The cost of running ``members`` (consecutive, in order) as one segment."""
    if len(members) == 1:
        return members[0]
    first, last = members[0], members[-1]
    # inner boundaries a plain run of the group keeps: one member saves its output, or the next its input
    inner_saved = sum(a.output_bytes for a, b in zip(members, members[1:]) if a.saves_output or b.saves_input)
    # a selective group keeps some of its members' calls: one stash level of each member, or none
    timed = all(m.seconds is not None for m in members)
    levels, whole = stash_frontier([m.stash_levels for m in members], by_seconds=timed)
    modes = frozenset.intersection(*(frozenset(m.modes) for m in members)) & GROUPABLE_MODES
    return SegmentCost(
        name=first.name,
        input_bytes=first.input_bytes,
        output_bytes=last.output_bytes,
        saved_bytes=sum(m.saved_bytes for m in members) + inner_saved,
        transient_bytes=max(m.transient_bytes for m in members),
        forward_transient_bytes=max(m.forward_transient_bytes + m.output_bytes for m in members),
        saves_input=first.saves_input,
        saves_output=last.saves_output,
        flops=sum(m.flops for m in members),
        inverse_flops=None,
        input_freeable=first.input_freeable,
        modes=modes or frozenset({Mode.KEEP}),
        seconds=sum(m.seconds for m in members) if timed else None,  # type: ignore[misc]
        mask_bytes=sum(m.mask_bytes for m in members), replay_seconds=sum(m.replay_seconds for m in members),
        rebuilt_bytes=sum(m.rebuilt_bytes for m in members),
        rebuild_seconds=sum(m.rebuild_seconds for m in members),
        stash_levels=levels, stash_levels_whole=whole and all(m.stash_levels_whole for m in members))


def coarsen(costs: Sequence[SegmentCost], size: int,
            may_join: Callable[[tuple[str, ...], str], bool]) -> list[tuple[tuple[str, ...], SegmentCost]]:
    """``costs`` taken ``size`` at a time from the first: each group, by its members' names, with its cost. A
    group ends early where ``may_join(group, next)`` is false (the next is not right after the group in the
    graph, or they would not run as one checkpoint), so every group is consecutive and checkpointable."""
    groups: list[list[SegmentCost]] = []
    for cost in costs:
        if groups and len(groups[-1]) < size and may_join(tuple(m.name for m in groups[-1]), cost.name):
            groups[-1].append(cost)
        else:
            groups.append([cost])
    return [(tuple(m.name for m in group), group_cost(group)) for group in groups]
