"""The passes of ``invfx.optimize``, in the order :data:`PIPELINE` runs them over a :class:`Compilation`:

Trace -> Annotate -> SimplifyCats -> LeanDropouts -> FindSegments -> RecomputeSavedInputs -> BuildRegions ->
CheckReconstruction -> MeasureCosts -> PlanModes -> GroupRegions -> WriteModule -> Calibrate -> Report

Up to FindSegments the passes analyse (and simplify) the traced graph; from there on it is left as it is (but
for RecomputeSavedInputs, which changes calls in place, no node added, removed or moved):
regions are built beside it and measured on it segment by segment, the plan and its chains are decided on the
segment list, and the module is written from the graph once (again, from the same graph, for each replan of a
budget's calibration). optimize then runs ``invfx.check`` on the result.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx
from torch import nn

from ..errors import BudgetError
from ..modes import Mode
from ..planner import (
    ChainPlan,
    SegmentCost,
    StashLevel,
    chain_extra_seconds,
    chain_peak,
    plain_peak,
    plan_chain,
    timed,
)
from ..regions.fused import tensors_in
from ..regions.modules import BodyRegion, InvertibleRegion, OptimizedModule
from ..report import Plan, PlanRow, _budget
from ..units import format_bytes, format_flops
from .annotate import annotate
from .chain import region_units
from .cost import measure_costs
from .example import example_run
from .groups import coarsen
from .infra import Compilation, CompilationPass, graph_signature
from .lean_dropout import lean_dropouts
from .recompute_saved import recompute_saved_inputs
from .rewrite import bind_attributes, build_checkpoint_region, build_invertible_region, region_name, write_graph
from .segments import COMPUTE, find_segments, graph_boundaries, plain_segment, why_not_checkpoint
from .simplify import split_through_cat
from .trace import trace
from .validate import check_reconstruction

__all__ = ["PIPELINE", "Trace", "Annotate", "SimplifyCats", "LeanDropouts", "FindSegments", "RecomputeSavedInputs",
           "BuildRegions", "CheckReconstruction", "MeasureCosts", "PlanModes", "GroupRegions", "WriteModule",
           "Calibrate", "Report"]


class Trace(CompilationPass):
    """The model as a GraphModule (torch.fx, with grad-mode switches recorded as calls; ``trace.py``)."""

    name = "trace"

    def call(self, state: Compilation) -> None:
        state.traced, state.opaque, state.constants = trace(state.model, state.leaf_modules, inputs=state.inputs)

    def ensures(self, state: Compilation) -> None:
        self.need(state.traced is not None, "no traced module")


class Annotate(CompilationPass):
    """Shapes, bytes, storages and producers on ``node.meta``, from one run on the example (``annotate.py``)."""

    name = "annotate"

    def requires(self, state: Compilation) -> None:
        self.need(state.traced is not None, "needs the traced module (run 'trace' first)")

    def call(self, state: Compilation) -> None:
        annotate(state.traced, state.inputs)

    def ensures(self, state: Compilation) -> None:
        self.need(all("bytes" in n.meta for n in state.traced.graph.nodes), "a node has no 'bytes' fact")


class SimplifyCats(CompilationPass):
    """``cat`` then ``split`` at the same places: the pieces are read directly (``simplify.py``)."""

    name = "simplify_cats"

    def requires(self, state: Compilation) -> None:
        self.need(state.traced is not None and state.segments is None,
                  "simplifies the traced graph before segments are found in it")

    def call(self, state: Compilation) -> None:
        split_through_cat(state.traced)


class LeanDropouts(CompilationPass):
    """Each ``nn.Dropout`` called runs as a LeanDropout, which saves a byte an element for backward instead of
    the float noise (``lean_dropout.py``). Not where the plan may keep everything anyway (a budget of 1.0, or
    keep the only mode), nor with ``OptimizeOptions(lean_dropout=False)``."""

    name = "lean_dropouts"

    def requires(self, state: Compilation) -> None:
        self.need(state.traced is not None and state.segments is None,
                  "rewrites the traced graph before segments are found in it")

    def call(self, state: Compilation) -> None:
        if state.options.lean_dropout and _saving_wanted(state):
            state.lean_dropouts = lean_dropouts(state.traced)


def _saving_wanted(state: Compilation) -> bool:
    """Whether the plan may want memory saved beyond plain training's (not under a budget of 1.0, nor where
    keep is the only mode)."""
    plain_allowed = isinstance(state.budget, float) and state.budget >= 1.0
    return not plain_allowed and state.modes != {Mode.KEEP}


class FindSegments(CompilationPass):
    """The graph cut into a chain of segments, invertible where the solver succeeds (``segments.py``), each
    named after the module it runs in; the segments that may not be a region at all, with the reason."""

    name = "find_segments"

    def requires(self, state: Compilation) -> None:
        self.need(state.traced is not None and all("bytes" in n.meta for n in state.traced.graph.nodes),
                  "needs the annotated traced module (run 'annotate' first)")

    def call(self, state: Compilation) -> None:
        traced, options = state.traced, state.options
        segments = find_segments(traced, state.modes, options.max_segment_nodes, options.max_solve_attempts)
        taken: set[str] = set()
        names, blocked = [], {}
        for i, segment in enumerate(segments):
            if segment.mode == Mode.INVERTIBLE:
                names.append(region_name(traced, segment.nodes, i, taken))
                continue
            reason = why_not_checkpoint(traced, segment)
            if reason is None:
                names.append(region_name(traced, segment.nodes, i, taken, prefix="seg_"))
            else:
                names.append(f"plain_{i}")
                blocked[names[-1]] = reason
        state.segments, state.names, state.blocked = segments, names, blocked
        state.signature = graph_signature(traced.graph)

    def ensures(self, state: Compilation) -> None:
        compute = [n for n in state.traced.graph.nodes if n.op in COMPUTE]
        self.need([n for s in state.segments for n in s.nodes] == compute,
                  "the segments do not cover every compute node once, in graph order")
        self.need(len(set(state.names)) == len(state.names) == len(state.segments), "segment names are not unique")


class _AfterSegments(CompilationPass):
    """A pass that reads the segments, and so needs the graph they were found in as it was."""

    def requires(self, state: Compilation) -> None:
        self.need(state.segments is not None, "needs the segments (run 'find_segments' first)")
        self.need(graph_signature(state.traced.graph) == state.signature,
                  "the traced graph changed after its segments were found")


class RecomputeSavedInputs(_AfterSegments):
    """A LayerNorm's or GELU's output that only Linear calls in the same segment read, in a segment that is not
    invertible, is saved by them as how to rebuild it from the op's input, which autograd keeps anyway
    (``recompute_saved.py``). It changes those calls in place (the segments stay as found). Where LeanDropouts
    is not done, nor this, nor with ``OptimizeOptions(recompute_saved=False)``."""

    name = "recompute_saved_inputs"

    def call(self, state: Compilation) -> None:
        if not (state.options.recompute_saved and _saving_wanted(state)):
            return
        segment_of = {node: segment for segment in state.segments for node in segment.nodes}

        def together(producer: fx.Node, reader: fx.Node) -> bool:
            segment = segment_of.get(producer)
            return segment is not None and segment is segment_of.get(reader) and segment.mode != Mode.INVERTIBLE

        state.recomputed_saved = recompute_saved_inputs(state.traced, together)

    def ensures(self, state: Compilation) -> None:
        self.need(graph_signature(state.traced.graph) == state.signature, "a node was added, removed or moved")


class BuildRegions(_AfterSegments):
    """For each invertible segment, its region (forward and rebuild bodies, fused backward), built beside the
    graph: what the next passes check and measure, and what the module runs if the plan inverts it."""

    name = "build_regions"

    def call(self, state: Compilation) -> None:
        state.regions = {name: build_invertible_region(state.traced, segment, name)
                         for name, segment in state.candidates().items() if segment.mode == Mode.INVERTIBLE}
        # (the module runs the same region where the plan keeps the segment alone, inverted or checkpointed)
        state.built.update({(name,): region for name, region in state.regions.items()})

    def ensures(self, state: Compilation) -> None:
        super().requires(state)  # (building a region leaves the graph as it was)


class CheckReconstruction(_AfterSegments):
    """Each invertible segment's region rebuilds the inputs the segment saw on the example, alone and through
    the regions after it (``validate.py``); those that do not are refused, with the reason."""

    name = "check_reconstruction"

    def requires(self, state: Compilation) -> None:
        super().requires(state)
        self.need(state.regions is not None, "needs the invertible regions (run 'build_regions' first)")

    def call(self, state: Compilation) -> None:
        state.refused, state.reconstruction_errors = check_reconstruction(
            state.traced, state.inputs, state.candidates(), state.regions)

    def ensures(self, state: Compilation) -> None:
        self.need(set(state.refused) <= set(state.regions), "refused a segment that is not invertible")


class MeasureCosts(_AfterSegments):
    """Each segment's memory and compute, measured on the example segment by segment (``cost.py``), with the
    modes it may take: keep and checkpoint, and invertible where it has a region that rebuilds."""

    name = "measure_costs"

    def requires(self, state: Compilation) -> None:
        super().requires(state)
        self.need(state.refused is not None, "needs the reconstruction check (run 'check_reconstruction' first)")

    def call(self, state: Compilation) -> None:
        candidates = state.candidates()
        allowed = {}
        for name in candidates:
            invertible = name in state.regions and name not in state.refused
            possible = {Mode.KEEP, Mode.CHECKPOINT, Mode.SELECTIVE} | ({Mode.INVERTIBLE} if invertible else set())
            allowed[name] = frozenset(possible & set(state.modes)) or frozenset({Mode.KEEP})
        state.costs = measure_costs(
            state.traced, state.inputs, candidates, state.regions, allowed,
            {name: s.rebuild.inverse_flops for name, s in candidates.items() if s.rebuild is not None},
            {name: bool(s.freeable) for name, s in candidates.items()}, timed=state.options.compute == "time",
            branches=state.options.exact_branches)

    def ensures(self, state: Compilation) -> None:
        self.need([c.name for c in state.costs.costs] == list(state.candidates()),
                  "a segment that may run as a region was not measured (or was measured out of order)")


class PlanModes(CompilationPass):
    """A mode per segment: the least memory, then the least compute; within a budget, the least compute
    (``invfx.planner``, on the cost model's estimate; Calibrate checks it by measuring)."""

    name = "plan_modes"

    def requires(self, state: Compilation) -> None:
        self.need(state.costs is not None, "needs the costs (run 'measure_costs' first)")

    def call(self, state: Compilation) -> None:
        if not state.costs.costs:  # no segment may run as a region (each writes into its input in place, ...)
            _plain_within(state)
            state.chain, state.chosen = None, {}
            return
        _take(state, *_plan(state, _chain_budget(state)))

    def ensures(self, state: Compilation) -> None:
        self.need(set(state.chosen) <= set(state.candidates()), "gave a mode to a segment that is not a candidate")
        self.need([n for g in state.groups for n in g] == [c.name for c in state.costs.costs],
                  "the groups do not cover the measured segments once, in order")
        for cost in state.costs.costs:
            self.need(state.chosen.get(cost.name, Mode.KEEP) in cost.modes | {Mode.KEEP},
                      f"gave {cost.name} a mode it does not allow")


class GroupRegions(CompilationPass):
    """The regions the module runs: one per segment not kept, and one chain per run of invertible segments
    that solves as one (``chain.py``); named after their mode (``ckpt_blocks_3``, ``inv_blocks_1_to_4``)."""

    name = "group_regions"

    def requires(self, state: Compilation) -> None:
        self.need(state.chosen is not None, "needs the plan's modes (run 'plan_modes' first)")

    def call(self, state: Compilation) -> None:
        state.units = region_units(state.traced, state.names, state.segments, state.chosen,
                                   chains=state.options.chains, max_nodes=state.options.max_segment_nodes,
                                   solved=state.solved_runs, groups=state.groups, merged=state.merged)

    def ensures(self, state: Compilation) -> None:
        run = [name for unit in state.units for name in unit.parts]
        planned = [name for name in state.names if state.chosen.get(name, Mode.KEEP) != Mode.KEEP]
        self.need(run == planned, "the regions do not run exactly the segments the plan does not keep, in order")
        self.need(len({u.name for u in state.units}) == len(state.units), "two regions have one name")


class WriteModule(_AfterSegments):
    """The optimized module: the traced graph written once with a call of each region in place of the
    segments it runs (``rewrite.write_graph``), sharing the model's parameters, buffers and submodules."""

    name = "write_module"

    def requires(self, state: Compilation) -> None:
        super().requires(state)
        self.need(state.units is not None, "needs the regions (run 'group_regions' first)")

    def call(self, state: Compilation) -> None:
        traced, regions = state.traced, {}
        for unit in state.units:
            region = state.built.get(unit.parts)
            if region is None:
                build = build_invertible_region if unit.mode == Mode.INVERTIBLE else build_checkpoint_region
                region = build(traced, unit.segment, unit.name)
            state.built[unit.parts] = region
            region.region_name, region.mode = unit.name, unit.mode
            if unit.mode == Mode.SELECTIVE:  # (the calls whose outputs it keeps: the plan's stash level)
                region.kept_calls = frozenset(call for part in unit.parts for call in state.kept_calls.get(part, ()))
            regions[unit.name] = region
        _set_rebuilds(state)
        graph = write_graph(traced.graph, [(unit.name, unit.segment) for unit in state.units])
        # (the GraphModule takes each submodule a node calls from its root: the regions stand there meanwhile)
        for name, region in regions.items():
            traced.add_module(name, region)
        try:
            optimized = OptimizedModule(traced, graph, type(state.model).__name__)
        finally:
            for name in regions:
                delattr(traced, name)
        _share_everything(optimized, state.model)
        for module in optimized.modules():
            if isinstance(module, InvertibleRegion):
                module.record_branches = state.options.exact_branches
        bind_attributes(optimized)
        optimized.train(state.model.training)
        state.optimized = optimized

    def ensures(self, state: Compilation) -> None:
        super().requires(state)  # (the traced graph is left as it was)
        called = [n.target for n in state.optimized.graph.nodes
                  if n.op == "call_module" and isinstance(state.optimized.get_submodule(n.target), BodyRegion)]
        self.need(called == [u.name for u in state.units], "the module does not call each region once, in order")


def _set_rebuilds(state: Compilation) -> None:
    """Each RecomputedInput on or off, as the plan says (``state.rebuilds_dropped``: its segment's Linear calls
    keep their inputs)."""
    for name, segment in zip(state.names, state.segments):
        for node in segment.nodes:
            if node.op == "call_module" and node.target in state.recomputed_saved:
                state.traced.get_submodule(node.target).active = name not in state.rebuilds_dropped


class Calibrate(CompilationPass):
    """With a budget, the plan is checked by measuring one training step of the module on the example inputs:
    where the measured peak exceeds the budget (the cost model is an estimate), plan again with the chain's
    budget lowered by the excess, and write the module again."""

    name = "calibrate"

    def requires(self, state: Compilation) -> None:
        self.need(state.optimized is not None, "needs the module (run 'write_module' first)")

    def call(self, state: Compilation) -> None:
        state.calibration = None
        if state.budget is None or state.chain is None:
            return
        budget, rounds = state.budget, state.options.calibration_rounds
        plain = _measure_step(state.model, state.inputs)
        target = budget * plain if isinstance(budget, float) else budget
        chain_budget = _chain_budget(state)
        least = None
        for round_ in range(rounds + 1):
            peak = _measure_step(state.optimized, state.inputs)
            if peak <= target:
                state.calibration = {"plain_bytes": plain, "peak_bytes": peak, "target_bytes": int(target)}
                return
            if state.chain is least:
                raise _measured_miss(budget, peak, plain, "the least achievable peak, measured on the example "
                                                          "inputs (the plan of least memory), is")
            if round_ == rounds:
                raise _measured_miss(budget, peak, plain, f"the last of {rounds + 1} plans tried "
                                                          "measures on the example inputs")
            chain_budget -= int(math.ceil(max(peak - target, 0.02 * target)))  # (at least 2%: converge)
            try:
                planned = _plan(state, chain_budget)
            except BudgetError:  # nothing fits the lowered budget: the plan of least memory is the last to try
                planned = _plan(state, None)
                least = planned[1]
            _take(state, *planned)
            GroupRegions()(state)
            WriteModule()(state)


class Report(CompilationPass):
    """The plan (``opt.plan``): a row per segment saying what it keeps, what it costs, why, and which region
    runs it."""

    name = "report"

    def requires(self, state: Compilation) -> None:
        self.need(state.optimized is not None and state.units is not None, "needs the module (run 'write_module')")

    def call(self, state: Compilation) -> None:
        costs = state.costs
        state.optimized.plan = Plan(
            _rows(state), state.opaque, chain=state.chain, outside_bytes=costs.outside_bytes, budget=state.budget,
            forward_flops=sum(c.flops for c in costs.costs), calibration=state.calibration,
            constants=state.constants,
            forward_seconds=sum(c.seconds for c in costs.costs) if timed(costs.costs) and costs.costs else None,
            thinned_stashes=[c.name for c in costs.costs if not c.stash_levels_whole and Mode.SELECTIVE in c.modes],
            lean_dropouts=state.lean_dropouts, recomputed_saved=_rebuilt(state))

    def ensures(self, state: Compilation) -> None:
        self.need(len(state.optimized.plan.rows) == len(state.segments), "the plan has not one row per segment")


PIPELINE: tuple[type[CompilationPass], ...] = (Trace, Annotate, SimplifyCats, LeanDropouts, FindSegments,
                                               RecomputeSavedInputs, BuildRegions,
                                               CheckReconstruction, MeasureCosts, PlanModes, GroupRegions,
                                               WriteModule, Calibrate, Report)


# --- planning within a budget -------------------------------------------------------------------------------

def _take(state: Compilation, groups: list[tuple[str, ...]], chain: ChainPlan, coarse: list[SegmentCost],
          rebuilds_dropped: frozenset[str] = frozenset()) -> None:
    """The plan, on the state: each segment's mode (its group's), the calls a selective one keeps (its
    group's stash level, from the group's cost the chain was planned on: the calls of all its members), and the
    segments that rebuild no saved input."""
    state.groups, state.chain, state.rebuilds_dropped = groups, chain, rebuilds_dropped
    state.chosen = {name: Mode(mode) for group, mode in zip(groups, chain.modes) for name in group}
    state.kept_calls = {}
    for index, (group, mode, cost) in enumerate(zip(groups, chain.modes, coarse)):
        if mode == Mode.SELECTIVE:
            chosen = chain.level(index)
            level = cost.stash_levels[-1 if chosen is None else chosen]
            for name in group:
                state.kept_calls[name] = level.calls


#: the group sizes planned (groups.coarsen): 1 (each segment alone) to 8 segments checkpointed as one
GROUP_SIZES = tuple(range(1, 9))


#: Where plans with more and fewer rebuilds of saved inputs differ in estimated extra time by less than this
#: fraction of the forward's time, the one of least peak is taken: rebuilding costs about its producers'
#: forward again, so dropping some buys little (the benchmark transformer at budget 0.75: 1.03x plain's step
#: with some dropped at 0.711 of plain's peak, 1.04x with all at 0.631), and a lower peak leaves room.
REBUILD_TOLERANCE = 0.05


def _plan(state: Compilation, chain_budget: int | None
          ) -> tuple[list[tuple[str, ...]], ChainPlan, list[SegmentCost], frozenset[str]]:
    """:func:`_plan_grouped`, and which segments need not rebuild their saved LayerNorm / GELU inputs
    (``recompute_saved``): a rebuild saves memory for backward time, which a budget with room to spare need
    not pay. Three plans are weighed: the plan made with every rebuild; the same plan with the rebuilds its
    estimated peak does without dropped, group by group (most time saved per byte first); and the plan made
    with none. The least estimated extra time wins, and of those within :data:`REBUILD_TOLERANCE` of a
    forward's time of it, the least estimated peak. With no budget (least memory), or where time is not
    measured (the planner weighs FLOPs, which do not see a rebuild), every rebuild stays."""
    groups, plan, coarse = _plan_grouped(state, chain_budget)
    costs = state.costs.costs
    if chain_budget is None or not any(c.rebuilt_bytes for c in costs) or plan.extra_seconds is None:
        return groups, plan, coarse, frozenset()
    candidates = [(plan.extra_seconds, plan.peak, groups, plan, coarse, frozenset())]
    # the plan made with every rebuild, less the rebuilds its budget does not need
    levels = plan.levels or None
    mixed = list(coarse)
    for i in sorted((i for i, c in enumerate(coarse) if c.rebuilt_bytes),
                    key=lambda i: -coarse[i].rebuild_seconds / coarse[i].rebuilt_bytes):
        trial = mixed[:i] + [coarse[i].without_rebuild()] + mixed[i + 1:]
        if chain_peak(trial, plan.modes, levels) <= chain_budget:
            mixed = trial
    lean = dataclasses.replace(plan, peak=chain_peak(mixed, plan.modes, levels),
                               extra_seconds=chain_extra_seconds(mixed, plan.modes, levels))
    dropped = frozenset(name for group, before, after in zip(groups, coarse, mixed) if after is not before
                        for name in group)
    candidates.append((lean.extra_seconds, lean.peak, groups, lean, mixed, dropped))
    # the plan made with none
    try:
        none_groups, none_plan, none_coarse = _plan_grouped(state, chain_budget,
                                                            [c.without_rebuild() for c in costs])
    except BudgetError:
        pass
    else:
        if none_plan.extra_seconds is not None:
            every = frozenset(c.name for c in costs if c.rebuilt_bytes)
            candidates.append((none_plan.extra_seconds, none_plan.peak, none_groups, none_plan, none_coarse, every))
    fastest = min(c[0] for c in candidates)
    tolerance = REBUILD_TOLERANCE * sum(c.seconds or 0.0 for c in costs)
    _, _, groups, plan, coarse, dropped = min((c for c in candidates if c[0] <= fastest + tolerance),
                                              key=lambda c: (c[1], c[0]))
    return groups, plan, coarse, dropped


def _plan_grouped(state: Compilation, chain_budget: int | None, segment_costs: list[SegmentCost] | None = None
                  ) -> tuple[list[tuple[str, ...]], ChainPlan, list[SegmentCost]]:
    """The best plan over the chain's granularities: each segment alone, segments checkpointed two at a time,
    and so on up to GROUP_SIZES (groups.coarsen). With a budget, the least extra compute (measured time where
    every segment has one, else FLOPs) among the plans that fit, ties to the finer chain; with none, the finest
    chain's plan of least peak (the default keeps invertible segments apart, which groups never are).

    A coarser chain keeps only the first input of each group, for the same recomputation, so it can be both
    leaner and faster than the finest one (ResNet depth 16, budget 0.5: three blocks per group planned +71 ms
    of recomputation, one at a time +104 ms). A coarser plan that recomputes no group is a plan of a finer chain
    seen through the coarser chain's derived costs, and is not taken once a finer chain has a plan. Returns the
    groups, the plan and the groups' costs it was made on. Raises BudgetError, with the least peak of any, if
    none fits. ``segment_costs``: the segments' costs to plan on, where not the measured ones."""
    costs = state.costs
    segment_costs = costs.costs if segment_costs is None else segment_costs
    may_join = _joinable(state)
    least = None
    best: tuple | None = None  # ((compute, order), names, plan, coarse)
    fallback: tuple | None = None  # the first coarser plan that recomputes no group
    tried: set[tuple[tuple[str, ...], ...]] = set()
    # Coarsest first: coarse chains are short and quick to plan, and the best plan so far bounds the compute of
    # the next, whose search then drops what cannot beat it (ResNet depth 140, budget 0.6, both rounds of planning:
    # 6.7 s finest first, 0.7 s coarsest first). No budget: the finest chain alone.
    order_of = {size: order for order, size in enumerate(GROUP_SIZES)}
    sizes = sorted(GROUP_SIZES, reverse=True) if chain_budget is not None else [min(GROUP_SIZES)]
    for size in sizes:
        grouping = coarsen(segment_costs, size, may_join)
        names = tuple(g for g, _ in grouping)
        if names in tried:
            continue  # (no more joins at this size than at a larger one)
        tried.add(names)
        coarse = [c for _, c in grouping]
        try:
            if chain_budget is not None and chain_budget < 0:
                raise BudgetError("what is kept outside the regions exceeds the budget")
            found = plan_chain(coarse, chain_budget, compute_bound=None if best is None else best[0][0])
        except BudgetError:
            lowest = plan_chain(coarse, None).peak
            least = lowest if least is None else min(least, lowest)
            continue
        if found is None:
            continue  # (nothing within the best plan's compute)
        grouped = any(len(group) > 1 for group in names)
        if grouped and not any(len(group) > 1 and mode != Mode.KEEP for group, mode in zip(names, found.modes)):
            # it recomputes no group: a plan of a finer chain, seen through the coarser chain's derived costs
            fallback = fallback or ((0.0, order_of[size]), names, found, coarse)
            continue
        compute = found.extra_seconds if found.extra_seconds is not None else found.extra_flops
        key = (compute, order_of[size])
        if best is None or key < best[0]:
            best = (key, names, found, coarse)
    best = best or fallback
    if best is not None:
        _, names, plan, coarse = best
        # (the plain peak the report compares with is the segments' own, not the coarse chain's estimate)
        return list(names), dataclasses.replace(plan, plain_peak=_plain_chain_peak(state)), coarse
    total = (least or 0) + costs.outside_bytes
    plain = _plain_chain_peak(state) + costs.outside_bytes
    raise BudgetError(f"invfx.optimize: memory budget {_budget(state.budget)} cannot be met: the least achievable "
                      f"peak is estimated at {format_bytes(total)} ({total} B, {total / plain:.3f} of plain "
                      f"{format_bytes(plain)}) at the example's size")


def _joinable(state: Compilation):
    """``may_join(group, name)`` for groups.coarsen: the segment is right after the group in the graph, nothing
    blocked between, and the group with it runs as one checkpoint (a merged segment cached on the state)."""
    position = {name: i for i, name in enumerate(state.names)}
    boundaries: list = []  # (worked out at the first group asked about: most plans fit without any)

    def may_join(group: tuple[str, ...], name: str) -> bool:
        if position[name] != position[group[-1]] + 1:
            return False
        key = (*group, name)
        if key not in state.merged:
            if not boundaries:
                boundaries.append(graph_boundaries(state.traced))
            nodes = [n for member in key for n in state.segment(member).nodes]
            segment = plain_segment(state.traced, nodes, boundaries[0])
            state.merged[key] = segment if segment is not None and \
                why_not_checkpoint(state.traced, segment) is None else None
        return state.merged[key] is not None

    return may_join


def _chain_budget(state: Compilation) -> int | None:
    """The budget in bytes of the chain of regions: what is saved outside them is the same in every plan."""
    budget, costs = state.budget, state.costs
    if budget is None:
        return None
    if isinstance(budget, float):
        plain = _plain_chain_peak(state) + costs.outside_bytes
        return int(budget * plain) - costs.outside_bytes
    return budget - costs.outside_bytes


def _rebuilt(state: Compilation) -> dict[str, int]:
    """``state.recomputed_saved`` less the RecomputedInputs the plan turned off."""
    return {name: nbytes for name, nbytes in state.recomputed_saved.items() if state.traced.get_submodule(name).active}


def _plain_chain_peak(state: Compilation) -> int:
    """The chain's peak in plain training of the model as written: the segments' own, measured with
    LeanDropouts and RecomputedInputs, and what those save (dropouts' noise, LayerNorm and GELU outputs: alive at
    plain's peak, where backward starts) added back, so that a fractional budget is one of the model's plain
    peak."""
    return plain_peak(state.costs.costs) + sum(state.lean_dropouts.values()) + sum(state.recomputed_saved.values())


def _plain_within(state: Compilation) -> None:
    """With no region to plan, a budget is met only if plain training meets it."""
    budget = state.budget
    if budget is None:
        return
    with example_run(state.model, state.inputs) as copies, torch.enable_grad():  # (as the step is measured)
        outputs = state.model(*copies)
    if not any(t.requires_grad for t in tensors_in(outputs)):
        return  # (no backward: nothing is kept for one, so every budget is met)
    plain = _measure_step(state.model, state.inputs)
    if isinstance(budget, int) and plain <= budget or isinstance(budget, float) and budget >= 1.0:
        return
    reasons = "; ".join(f"{name}: {why}" for name, why in state.blocked.items()) or "the model has no segment"
    raise BudgetError(f"invfx.optimize: memory budget {_budget(budget)} cannot be met: no segment of the model "
                      f"can be checkpointed or inverted ({reasons}); plain training measures {format_bytes(plain)}")


def _measured_miss(budget, peak: int, plain: int, what: str) -> BudgetError:
    return BudgetError(f"invfx.optimize: memory budget {_budget(budget)} cannot be met: {what} {format_bytes(peak)} "
                       f"({peak} B, {peak / plain:.3f} of plain {format_bytes(plain)}), though the cost model "
                       "estimated less")


def _measure_step(module: nn.Module, inputs) -> int:
    """Peak bytes of one training step of ``module`` on ``inputs`` (:func:`invfx.measure`), leaving parameters'
    gradients, buffers (BatchNorm statistics) and the RNG as they were."""
    from ..measure import measure  # (invfx.measure reports to an optimized module's plan)

    with example_run(module, inputs, keep_grads=True) as copies:
        return measure(module, *copies, steps=1).peak_bytes


# --- the optimized module -----------------------------------------------------------------------------------

def _share_everything(optimized: fx.GraphModule, model: nn.Module) -> None:
    """Give the optimized module the model's own children, parameters and buffers, under their names and in
    their order (then the regions), so that its state_dict is the model's and an optimizer built on
    model.parameters() trains it."""
    regions = {n: m for n, m in optimized._modules.items() if n not in model._modules}
    optimized._modules.clear()
    optimized._modules.update(model._modules)
    optimized._modules.update(regions)
    optimized._parameters.clear()
    optimized._parameters.update(model._parameters)
    # fx made tensors created in forward (``torch.tensor(2.0)``) buffers of the traced module: they stay, out of
    # the state_dict (dropping them broke every model with such a constant: AttributeError on the first call)
    constants = {name: b for name, b in optimized._buffers.items() if name not in model._buffers}
    optimized._buffers.clear()
    optimized._buffers.update(model._buffers)
    optimized._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
    for name, value in constants.items():
        optimized.register_buffer(name, value, persistent=False)


# --- the plan's rows ----------------------------------------------------------------------------------------

def _rows(state: Compilation) -> list[PlanRow]:
    """A plan row per segment, in graph order, saying what it keeps, what it costs, why, and which region
    runs it (``region``: its own, or the chain it is a link of)."""
    costs = {c.name: c.without_rebuild() if c.name in state.rebuilds_dropped else c for c in state.costs.costs}
    own_name: dict[str, str] = {}  # the name of the region that runs a segment alone, or would (a chain's link)
    runs_in: dict[str, str] = {}
    unfused: dict[str, str] = {}
    first_of: dict[str, str] = {}
    for unit in state.units:
        region = state.built[unit.parts]
        first_of[unit.name] = unit.parts[0]
        for part, link in zip(unit.parts, unit.links):
            runs_in[part], own_name[part] = unit.name, link
        why = getattr(region, "unfused_because", None)
        if why and unit.mode == Mode.INVERTIBLE:
            unfused[unit.name] = why
    rows = []
    for name, segment in zip(state.names, state.segments):
        cost = costs.get(name)
        mode = Mode(state.chosen.get(name, Mode.KEEP))
        error = state.reconstruction_errors.get(name)
        risk = None
        if segment.rebuild is not None:
            risk = str(segment.rebuild.risk) + (f", err {error:.1g}" if error is not None else "")
        region = runs_in.get(name)
        kept, recompute = 0, 0.0
        own = _own_stash(state, name) if mode == Mode.SELECTIVE and cost is not None else None
        if cost is not None:
            # what it holds besides its input, and its input where it keeps it (a group keeps only its first
            # member's)
            keeps_input = cost.saves_input if mode == Mode.KEEP else \
                mode in (Mode.CHECKPOINT, Mode.SELECTIVE) and not (region and name != first_of[region])
            kept = (own.nbytes + cost.mask_bytes if own else cost.held_bytes(mode)) + cost.input_bytes * keeps_input
            recompute = max(cost.flops - own.flops, 0.0) if own else cost.recompute_flops(mode)
        kept_ops = list(own.calls) if own else []
        recomputed_ops = [n.name for n in segment.nodes if n.name not in kept_ops] if own else []
        rows.append(PlanRow(
            name=own_name[name] if region else f"({name.split('_', 1)[-1]})", region=region,
            nodes=len(segment.nodes), mode=mode, kept_bytes=kept, recompute_flops=recompute, risk=risk,
            why=_why(state, name, cost, mode, kept_ops, recomputed_ops) + (
                f"; its backward recomputes the region whole ({unfused[region]})" if region in unfused else ""),
            saved_bytes=cost.saved_bytes if cost else None,
            input_bytes=cost.input_bytes if cost else sum(n.meta.get("bytes", 0) for n in segment.inputs),
            flops=cost.flops if cost else None, inverse_flops=cost.inverse_flops if cost else None,
            freed_bytes=sum(n.meta.get("bytes", 0) for n in segment.freeable) if mode == Mode.INVERTIBLE else 0,
            reconstruction_error=error, inputs=[n.name for n in segment.inputs],
            freed=[n.name for n in segment.freeable] if mode == Mode.INVERTIBLE else [],
            kept_ops=kept_ops, recomputed_ops=recomputed_ops,
            branch_bytes=cost.branch_bytes if cost and mode == Mode.INVERTIBLE else 0,
            branch_ops=dict(state.costs.branches.get(name, {})) if mode == Mode.INVERTIBLE else {},
            mask_bytes=cost.mask_bytes if cost and mode in (Mode.CHECKPOINT, Mode.SELECTIVE) else 0))
    return rows


def _names(names: list[str], most: int = 3) -> str:
    """``conv1, conv2`` or ``bn1, relu, bn2 and 2 more``."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _own_stash(state: Compilation, name: str) -> StashLevel:
    """What a selective segment keeps of its own: its calls in the stash level its group keeps, their bytes and
    the FLOPs they skip (a group's level spans its members)."""
    calls = state.costs.stash_calls.get(name, {})
    chosen = [calls[c] for c in state.kept_calls.get(name, ()) if c in calls]
    return StashLevel(sum(c.nbytes for c in chosen), sum(c.flops for c in chosen),
                      sum(c.seconds for c in chosen), tuple(c.calls[0] for c in chosen))


def _input_kept(cost) -> str:
    """``its input`` or ``its input and its dropouts' masks (64.0 KiB)``: what a checkpoint of it keeps."""
    return f"its input and its dropouts' masks ({format_bytes(cost.mask_bytes)})" if cost.mask_bytes else "its input"


def _why(state: Compilation, name: str, cost, mode: Mode, kept_ops: list[str], recomputed_ops: list[str]) -> str:
    segment = state.segment(name)
    if name in state.blocked:
        return f"plain code: {state.blocked[name]}"
    invertible = segment.mode == Mode.INVERTIBLE
    if name in state.refused:
        inverse_note = f"not invertible here: {state.refused[name]}"
    elif invertible:
        rules = sorted({s.rule.name for s in segment.rebuild.steps if s.rule is not None}) or ["recomputation"]
        inverse_note = "rebuilt by " + ", ".join(rules)
    else:
        inverse_note = "no inverse found"
    if cost is None:
        return inverse_note
    allowed = cost.allowed_modes
    if mode == Mode.SELECTIVE:
        own = _own_stash(state, name)
        return (f"keeps {_input_kept(cost)} and the outputs of {_names(kept_ops) or 'none of its calls'} "
                f"({format_bytes(own.nbytes)}), recomputes {_names(recomputed_ops)} for "
                f"+{format_flops(max(cost.flops - own.flops, 0.0))} FLOPs (a "
                f"checkpoint would recompute +{format_flops(cost.flops)}) ({inverse_note})")
    if mode == Mode.INVERTIBLE:
        extra = (f"; checkpoint would keep {format_bytes(cost.input_bytes)} for +{format_flops(cost.flops)}"
                 if Mode.CHECKPOINT in allowed else "")
        kept = "keeps nothing"
        branches = state.costs.branches.get(name) if state.costs is not None else None
        if branches and cost.branch_bytes:
            ops = ", ".join(f"{count} {kind}" for kind, count in sorted(branches.items()))
            kept = (f"keeps only its sub-networks' branches ({ops}: {format_bytes(cost.branch_bytes)}, for their "
                    "recomputation on rebuilt inputs)")
        return f"{kept}, {inverse_note} (+{format_flops(cost.recompute_flops(mode))} FLOPs){extra}"
    if mode == Mode.CHECKPOINT:
        if Mode.INVERTIBLE in allowed:
            return (f"within the budget for +{format_flops(cost.flops)} FLOPs; invertible would keep nothing for "
                    f"+{format_flops(cost.flops + cost.inverse_flops)}")
        return f"keeps {_input_kept(cost)} only, recomputed for +{format_flops(cost.flops)} FLOPs ({inverse_note})"
    if tuple(allowed) == (Mode.KEEP,):
        return f"no other mode allowed ({inverse_note})"
    if cost.saved_bytes + cost.input_bytes * cost.saves_input <= cost.input_bytes:
        return f"saves no more than a checkpoint would keep ({inverse_note})"
    return f"the budget allows it; recomputing would cost +{format_flops(cost.flops)} FLOPs ({inverse_note})"
