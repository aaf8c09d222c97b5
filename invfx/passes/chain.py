"""Which regions the module runs: a region per segment that is not kept, and a run of consecutive invertible
segments merged into one region, a chain.

Each invertible segment could run as a region of its own: an autograd node with its own forward and backward
set-up, whose outputs the next region frees again. A run of invertible segments in which each reads exactly
what the one before it made (and nothing else reads that) runs as one region instead: its body is the run's
nodes, solved again as one segment (the same inverses in the same order), and only the run's last outputs are
kept. Its backward still holds one sub-network's graph at a time, and it lets go of its output's gradient once
used (``_RegionCall.take_output_grads``), so it needs no more memory; the per-region costs of the runtime are
paid once per chain instead of once per block.

Everything here works on the segment list; the graph is not touched (``rewrite.write_graph`` writes it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.fx as fx

from ..modes import Mode
from .rewrite import unique_name
from .segments import MAX_NODES, Segment, invertible_segment

__all__ = ["RegionUnit", "region_units", "final_names"]

_MODE_PREFIX = {Mode.INVERTIBLE: "inv_", Mode.CHECKPOINT: "ckpt_", Mode.SELECTIVE: "sac_"}


@dataclass
class RegionUnit:
    """One region of the optimized module: its name, mode and segment (the links' nodes solved as one, for a
    chain), and the names of the segments it runs (one, or a chain's links)."""

    name: str
    mode: Mode
    segment: Segment
    parts: tuple[str, ...]
    links: tuple[str, ...]  # what each part's own region is called (a chain's links, as the plan names them)

    @property
    def is_chain(self) -> bool:
        return len(self.parts) > 1


def final_names(root: fx.GraphModule, names: Sequence[str], chosen: Mapping[str, Mode]) -> dict[str, str]:
    """The name of the region running each segment that is not kept, after its mode: ``ckpt_blocks_3`` for the
    segment ``seg_blocks_3`` checkpointed, ``inv_blocks_3`` for an invertible one; unique in ``root``."""
    renamed: dict[str, str] = {}
    taken = set(names)
    for name in names:
        mode = chosen.get(name, Mode.KEEP)
        taken.discard(name)
        if mode == Mode.KEEP:
            continue
        # (a segment's own name is free here: region_name chose it unique in root, and it left taken above)
        renamed[name] = unique_name(root, _MODE_PREFIX[Mode(mode)] + name.split("_", 1)[1], taken)
    return renamed


def region_units(root: fx.GraphModule, names: Sequence[str], segments: Sequence[Segment],
                 chosen: Mapping[str, Mode], *, chains: bool = True, max_nodes: int = MAX_NODES,
                 solved: dict[tuple[str, ...], Segment | str] | None = None,
                 groups: Sequence[tuple[str, ...]] = (),
                 merged: Mapping[tuple[str, ...], Segment | None] | None = None) -> list[RegionUnit]:
    """The regions, in graph order, that run the segments ``chosen`` does not keep; with ``chains``, each run
    of consecutive invertible segments that can form a chain is one region. ``solved`` caches the runs'
    segments (solving a run is the costly part, and a budget's calibration asks again). ``groups``: segments
    the plan checkpoints as one (groups.py), each with its segment in ``merged``."""
    final = final_names(root, names, chosen)
    taken = set(final.values())
    solved = {} if solved is None else solved
    together = {group[0]: group for group in groups if len(group) > 1}
    units: list[RegionUnit] = []
    run: list[tuple[str, Segment]] = []

    def flush() -> None:
        for chunk in _chunks(run, max_nodes):
            units.extend(_merged(root, chunk, final, taken, solved))
        run.clear()

    inside: set[str] = set()
    for name, segment in zip(names, segments):
        if name in inside:
            continue
        mode = Mode(chosen.get(name, Mode.KEEP))
        if name in together and mode != Mode.KEEP:
            group = together[name]
            inside.update(group)
            flush()
            whole = (merged or {}).get(group)
            if whole is None:
                raise ValueError(f"the group {group} has no merged segment")
            links = tuple(final[n] for n in group)
            for link in links:
                taken.discard(link)
            units.append(RegionUnit(_chain_name(root, links[0], links[-1], taken), mode, whole, group, links))
            continue
        if chains and mode == Mode.INVERTIBLE and _may_link(segment):
            if run and not _follows(run[-1][1], segment):
                flush()
            run.append((name, segment))
            continue
        flush()
        if mode != Mode.KEEP:
            units.append(RegionUnit(final[name], mode, segment, (name,), (final[name],)))
    flush()
    return units


def _follows(before: Segment, after: Segment) -> bool:
    """Whether ``after`` reads exactly the outputs of ``before``, nothing after it reads them, and no node at all
    stands between the two in the graph."""
    if before.nodes[-1].next is not after.nodes[0]:
        return False
    inside = set(before.nodes) | set(after.nodes)
    return bool(before.outputs) and set(after.inputs) == set(before.outputs) and \
        all(user in inside for value in before.outputs for user in value.users)


def _may_link(segment: Segment) -> bool:
    """Whether an invertible segment may be a link of a chain: it keeps no input (a kept input is a value that
    lives on after it) and reads no attribute by ``get_attr`` (a parameter read functionally, as the examples'
    Glow reads its actnorm's ``loc`` and ``log_scale``).

    The second is how chains were measured, not a rule of correctness: chaining Glow's steps measured a higher
    peak than running them apart (Glow(channels=3, levels=2, depth=8, hidden=64) on 16x3x32x32: 4.879 MiB against
    4.692 MiB; the four steps of a level in float64 on 2x3x16x16: 545 KB against 480 KB), which is not understood
    yet."""
    return not segment.kept and not any(a.op == "get_attr" for n in segment.nodes for a in n.all_input_nodes)


def _chunks(run: list[tuple[str, Segment]], max_nodes: int) -> list[list[tuple[str, Segment]]]:
    """A run cut into chains of at most ``max_nodes`` nodes, the longest segment the solver is asked for."""
    chunks: list[list[tuple[str, Segment]]] = [[]]
    size = 0
    for name, segment in run:
        if chunks[-1] and size + len(segment.nodes) > max_nodes:
            chunks.append([])
            size = 0
        chunks[-1].append((name, segment))
        size += len(segment.nodes)
    return [chunk for chunk in chunks if chunk]


def _merged(root: fx.GraphModule, chunk: list[tuple[str, Segment]], final: dict[str, str], taken: set[str],
            solved: dict[tuple[str, ...], Segment | str]) -> list[RegionUnit]:
    """One chain region for the links of ``chunk``, solved as one segment; if they do not solve as one (the
    solver's search is bounded), a region per link, as they were."""
    apart = [RegionUnit(final[name], Mode.INVERTIBLE, segment, (name,), (final[name],)) for name, segment in chunk]
    if len(chunk) == 1:
        return apart
    key = tuple(name for name, _ in chunk)
    if key not in solved:
        nodes = [n for _, segment in chunk for n in segment.nodes]
        # the first link's freeable inputs were proven when it was found; inside the run, values are internal
        solved[key] = invertible_segment(root, nodes, chunk[0][1].freeable)
    segment = solved[key]
    if isinstance(segment, str) or segment.kept:
        return apart
    for name in key:
        taken.discard(final[name])
    links = tuple(final[name] for name in key)
    return [RegionUnit(_chain_name(root, links[0], links[-1], taken), Mode.INVERTIBLE, segment, key, links)]


def _chain_name(root: fx.GraphModule, first_name: str, last_name: str, taken: set[str]) -> str:
    """Its first and last links' names joined on what they share: ``inv_blocks_1_to_18`` for ``inv_blocks_1``
    to ``inv_blocks_18``; unique."""
    first, last = first_name.split("_"), last_name.split("_")
    n = 0
    while n < min(len(first), len(last)) - 1 and first[n] == last[n]:
        n += 1
    return unique_name(root, "_".join(first) + "_to_" + "_".join(last[n:]), taken)
