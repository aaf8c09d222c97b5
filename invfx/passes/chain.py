"""Pass 7: a run of consecutive invertible regions becomes one region, a chain.

After planning, each invertible segment is a region of its own: an autograd node with its own forward and
backward set-up, whose outputs the next region frees again. A run of invertible regions in which each reads
exactly what the one before it made (and nothing else reads that) runs as one region instead: its body is the
run's nodes, solved again as one segment (the same inverses in the same order), and only the run's last
outputs are kept. Its backward still holds one sub-network's graph at a time, and it lets go of its output's
gradient once used (``_RegionCall.take_output_grads``), so it needs no more memory; the per-region costs of
the runtime are paid once per chain instead of once per block.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from ..modes import Mode
from .rewrite import InvertibleRegion, inline_region, rewrite_segment, unique_name
from .segments import COMPUTE, MAX_NODES, invertible_segment

__all__ = ["merge_chains"]


def merge_chains(root: fx.GraphModule, max_nodes: int = MAX_NODES) -> dict[str, str]:
    """Merge each run of consecutive invertible regions of ``root`` into one region; returns, for each region
    merged, the name of the chain that runs it now."""
    merged: dict[str, str] = {}
    taken = {name for name, _ in root.named_children()}
    for run in _runs(root, max_nodes):
        chain = _merge(root, run, taken)
        if chain is not None:
            merged.update({name: chain for name in run})
    if merged:
        root.graph.lint()
        root.recompile()
    return merged


def _runs(root: fx.GraphModule, max_nodes: int) -> list[list[str]]:
    """The names of the regions in each run of two or more that can form a chain, in graph order."""
    calls = [n for n in root.graph.nodes if n.op == "call_module" and _chainable(root, n)]
    runs, current = [], []
    for call in calls:
        if current and _follows(current[-1], call):
            current.append(call)
            continue
        if len(current) > 1:
            runs.append(current)
        current = [call]
    if len(current) > 1:
        runs.append(current)
    return [chunk for run in runs for chunk in _chunks(root, [call.target for call in run], max_nodes)
            if len(chunk) > 1]


def _chunks(root: fx.GraphModule, names: list[str], max_nodes: int) -> list[list[str]]:
    """A run cut into chains of at most ``max_nodes`` nodes, the longest segment the solver is asked for."""
    chunks, size = [[]], 0
    for name in names:
        nodes = sum(n.op in COMPUTE for n in root.get_submodule(name).forward_body.graph.nodes)
        if chunks[-1] and size + nodes > max_nodes:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += nodes
    return chunks


def _chainable(root: fx.GraphModule, call: fx.Node) -> bool:
    region = root.get_submodule(call.target)
    # (a region keeping an input reads a value that lives on after it: it is not a link of a chain)
    return isinstance(region, InvertibleRegion) and region.mode == Mode.INVERTIBLE and region.fused and not region.kept


def _follows(before: fx.Node, after: fx.Node) -> bool:
    """Whether ``after`` reads exactly the outputs of ``before``, nothing else reads them, and nothing runs
    between the two."""
    reads = list(before.users)
    if not reads or after.kwargs or not all(isinstance(a, fx.Node) for a in after.args):
        return False
    for read in reads:
        if read.op != "call_function" or read.target is not operator.getitem or read.args[0] is not before \
                or list(read.users) != [after]:
            return False
    if set(after.args) != set(reads):
        return False
    node = before.next
    while node is not after:
        if node not in reads:
            return False
        node = node.next
    return True


def _merge(root: fx.GraphModule, names: list[str], taken: set[str]) -> str | None:
    """Put the regions back as plain code, then rewrite their nodes as one region; if they do not solve as
    one (the solver's search is bounded), each is rewritten again as it was. Returns the chain's name."""
    regions = [root.get_submodule(name) for name in names]
    calls = {n.target: n for n in root.graph.nodes if n.op == "call_module" and n.target in names}
    # what the first region frees: proven when it was found (read from an earlier region, its inputs are that
    # region's outputs, which look like views now); inside the run, inputs are plain values again
    first = calls[names[0]]
    freeable = [first.args[p] for p in regions[0].free]
    pieces = []
    for name, region in zip(names, regions):
        pieces.append(inline_region(root, calls[name], region))
        delattr(root, name)
        taken.discard(name)
    nodes = [n for piece in pieces for n in piece]
    segment = invertible_segment(root, nodes, freeable)
    if isinstance(segment, str) or segment.kept:
        # the last first, as optimize rewrites them: a rewrite makes its inputs' producer's outputs a call's
        # items, which look like views to the region before it
        for name, region, piece in reversed(list(zip(names, regions, pieces))):
            again = invertible_segment(root, piece, freeable)
            if isinstance(again, str):  # (it was solved before, on the same nodes)
                raise AssertionError(f"{name}: no longer solves after being put back: {again}")
            _carry_state(rewrite_segment(root, again, name), [region])
            taken.add(name)
        return None
    name = _chain_name(root, regions, taken)
    chain = rewrite_segment(root, segment, name)
    _carry_state(chain, regions)
    return name


def _chain_name(root: fx.GraphModule, regions: list[InvertibleRegion], taken: set[str]) -> str:
    """Its first and last links' names joined on what they share: ``inv_blocks_1_to_18`` for ``inv_blocks_1``
    to ``inv_blocks_18``; unique."""
    first, last = regions[0].region_name.split("_"), regions[-1].region_name.split("_")
    n = 0
    while n < min(len(first), len(last)) - 1 and first[n] == last[n]:
        n += 1
    return unique_name(root, "_".join(first) + "_to_" + "_".join(last[n:]), taken)


def _carry_state(region: InvertibleRegion, parts: list[InvertibleRegion]) -> None:
    """What planning found out about the parts (their reconstruction error on the example) holds for the
    region that runs them."""
    errors = [p.reconstruction_error for p in parts if getattr(p, "reconstruction_error", None) is not None]
    if errors:
        region.reconstruction_error = max(errors)
