"""``invfx.optimize``: a model written as plain PyTorch, rewritten so that its invertible segments keep nothing
for backward and rebuild their inputs from their outputs instead."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from .check import check_gradients as check_step
from .errors import BudgetError, InvfxError
from .modes import Mode
from .options import OptimizeOptions
from .passes import annotate, find_segments, rewrite_segment, trace
from .passes.chain import merge_chains
from .passes.cost import measure_costs
from .passes.example import example_run
from .passes.rewrite import apply_modes, bind_attributes, region_name, rewrite_checkpoint
from .passes.segments import why_not_checkpoint
from .passes.simplify import split_through_cat
from .passes.validate import check_reconstruction
from .planner import plain_peak, plan_chain
from .report import Plan, PlanRow, _budget
from .units import format_bytes, format_flops

__all__ = ["optimize", "OptimizedModule", "Plan", "PlanRow"]  # (Plan lives in report.py; pickles name it here)

MODES = tuple(Mode)
_MODE_NAMES = tuple(m.value for m in Mode)


class OptimizedModule(fx.GraphModule):
    """A GraphModule that shares the original model's parameters and buffers (same ``state_dict`` keys) and
    runs its invertible segments as invfx regions. ``plan`` describes the segments."""

    plan: Plan


#: non-tensor arguments an example may hold (``forward(x, scale: float)``): passed through as they are
_SCALARS = (bool, int, float, complex, str, type(None))


def _check_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    what = ("invfx.optimize: example_inputs must be a tensor or a tuple of tensors (numbers, strings and None "
            "may stand for non-tensor arguments)")
    if not isinstance(example_inputs, (tuple, list)):
        raise InvfxError(f"{what}, got {type(example_inputs).__name__}")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, (torch.Tensor, *_SCALARS)):
            raise InvfxError(f"{what}; example_inputs[{i}] is a {type(x).__name__} (pass a container's tensors one "
                             "by one)")
    if not any(isinstance(x, torch.Tensor) for x in example_inputs):
        raise InvfxError(f"{what}; {example_inputs!r} holds no tensor")
    return tuple(example_inputs)


def _check_modes(modes) -> None:
    if isinstance(modes, str) or not isinstance(modes, (tuple, list, set, frozenset)):
        raise InvfxError(f"invfx.optimize: modes must be a tuple of mode names from {_MODE_NAMES}, got {modes!r}")
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise InvfxError(f"invfx.optimize: unknown modes {sorted(map(str, unknown))}; choose from {_MODE_NAMES}")


def _check_leaf_modules(leaf_modules) -> None:
    if isinstance(leaf_modules, (str, nn.Module)) or not isinstance(leaf_modules, (tuple, list, set, frozenset)):
        raise InvfxError("invfx.optimize: leaf_modules must be a list of nn.Module classes or instances, got "
                         f"{leaf_modules!r}")
    for item in leaf_modules:
        if not (isinstance(item, nn.Module) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise InvfxError(f"invfx.optimize: leaf_modules holds {item!r}, which is neither an nn.Module class "
                             "nor an nn.Module")


def _check_not_sharded(model: nn.Module) -> None:
    """FSDP2's hooks gather parameters when a wrapped module is called; the optimized module calls the traced
    modules' leaves, never the wrapped ones, so a model sharded before optimize does not run (torch says "mixed
    torch.Tensor and DTensor")."""
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp_module is None:
        return
    sharded = [name or "(the model)" for name, m in model.named_modules() if isinstance(m, fsdp_module)]
    if sharded:
        raise InvfxError(f"invfx.optimize: {', '.join(sharded)} already wrapped by fully_shard (FSDP2); optimize "
                         "the unsharded model, then apply fully_shard to the optimized module")


def optimize(model: nn.Module, example_inputs, *, memory_budget=None, modes: Sequence[str] = MODES,
             leaf_modules: Sequence[type | nn.Module] = (), check_gradients: bool = True,
             options: OptimizeOptions | None = None) -> OptimizedModule:
    """Rewrite ``model`` (unchanged itself) into a GraphModule sharing its parameters and buffers, in which each
    segment of the graph is kept (plain autograd), checkpointed (recomputed in backward) or invertible (its
    inputs freed in forward, rebuilt from its outputs in backward), as the plan chooses.

    ``memory_budget``: None plans the least memory, then the least compute. A float in (0, 1] is a fraction of
    the plain activation memory, an int a number of bytes (at the example inputs' size); the plan is the least
    extra compute within it, and :class:`invfx.BudgetError` says the least achievable when nothing fits. Costs
    are measured on ``example_inputs`` (see ``invfx.passes.cost``); ``print(opt.plan)`` shows them.

    ``check_gradients``: before returning, compare one training step of the optimized module with plain
    autograd's on the example inputs (a float64 copy where it fits; see ``invfx.check``) and raise
    :class:`invfx.GradientCheckError`, naming the region, if any gradient differs. False skips it (it costs a
    deep copy of the model and two training steps).

    ``options``: how far the searches go (:class:`invfx.OptimizeOptions`: the longest segment, failed solves
    per start, calibration rounds, whether invertible regions are merged into chains).
    """
    if not isinstance(model, nn.Module):
        raise InvfxError(f"invfx.optimize: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, OptimizedModule):
        raise InvfxError("invfx.optimize: the model is already optimized (an OptimizedModule); optimize the "
                         "original model again instead (it shares its parameters with this one)")
    inputs = _check_inputs(example_inputs)
    _check_modes(modes)
    _check_leaf_modules(leaf_modules)
    _check_budget(memory_budget)
    _check_not_sharded(model)
    if options is None:
        options = OptimizeOptions()
    elif not isinstance(options, OptimizeOptions):
        raise InvfxError(f"invfx.optimize: options must be an invfx.OptimizeOptions, got {type(options).__name__}")

    traced, opaque, constants = trace(model, leaf_modules, num_inputs=len(inputs))
    annotate(traced, inputs)
    split_through_cat(traced)
    segments = find_segments(traced, modes, options.max_segment_nodes, options.max_solve_attempts)
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
    # Last segment first: a rewrite replaces a segment's outputs in the graph, and only later segments read
    # them; earlier segments, still to be rewritten, keep referring to nodes that are still there.
    for name, segment in reversed(list(zip(names, segments))):
        if segment.mode == Mode.INVERTIBLE:
            rewrite_segment(traced, segment, name)
        elif name not in blocked:
            rewrite_checkpoint(traced, segment, name)
    traced.graph.lint()
    optimized = OptimizedModule(traced, traced.graph, type(model).__name__)
    _share_everything(optimized, model)
    bind_attributes(optimized)
    refused = check_reconstruction(optimized, inputs)

    by_name = dict(zip(names, segments))
    allowed = {}
    for name, segment in by_name.items():
        if name in blocked:
            continue
        invertible = segment.mode == Mode.INVERTIBLE and name not in refused
        possible = {Mode.KEEP, Mode.CHECKPOINT} | ({Mode.INVERTIBLE} if invertible else set())
        allowed[name] = frozenset(possible & set(modes)) or frozenset({Mode.KEEP})
    measured = measure_costs(optimized, inputs, allowed,
                             {n: s.rebuild.inverse_flops for n, s in by_name.items() if s.rebuild is not None},
                             {n: bool(s.freeable) for n, s in by_name.items()})
    regions = {c.name: optimized.get_submodule(c.name) for c in measured.costs}
    if measured.costs:
        chain, calibration = _plan_within(optimized, model, inputs, measured, memory_budget, regions,
                                          options.calibration_rounds)
        chosen = dict(zip((c.name for c in measured.costs), chain.modes))
    else:  # no segment may run as a region (e.g. each writes into its input in place): plain code, said why
        chain, calibration, chosen = None, _plain_within(model, inputs, memory_budget, blocked), {}
    apply_modes(optimized, chosen)
    chains = merge_chains(optimized, options.max_segment_nodes) if options.chains else {}
    if chains:
        bind_attributes(optimized)
    unfused = {name: region.unfused_because for name, region in optimized.named_children()
               if getattr(region, "unfused_because", None) and getattr(region, "mode", None) == Mode.INVERTIBLE}
    rows = _rows(names, segments, measured, chosen, blocked, refused, regions, chains, unfused)
    optimized.plan = Plan(rows, opaque, chain=chain, outside_bytes=measured.outside_bytes, budget=memory_budget,
                          forward_flops=sum(c.flops for c in measured.costs), calibration=calibration,
                          constants=constants)
    optimized.train(model.training)
    if check_gradients:
        regions_run = {}
        for row in rows:
            if row["mode"] != Mode.KEEP and row["region"]:
                regions_run.setdefault(row["region"], []).append(row["name"])
        optimized.plan.gradient_check = check_step(model, optimized, inputs, regions_run)
    return optimized


def _plain_within(model, inputs, budget, blocked: dict) -> None:
    """With no region to plan, a budget is met only if plain training meets it."""
    if budget is None:
        return None
    plain = _measure_step(model, inputs)
    if isinstance(budget, int) and plain <= budget or isinstance(budget, float) and budget >= 1.0:
        return None
    reasons = "; ".join(f"{name}: {why}" for name, why in blocked.items()) or "the model has no segment"
    raise BudgetError(f"invfx.optimize: memory budget {_budget(budget)} cannot be met: no segment of the model "
                      f"can be checkpointed or inverted ({reasons}); plain training measures {format_bytes(plain)}")


def _check_budget(budget) -> None:
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise InvfxError(f"invfx.optimize: memory_budget must be None, a fraction in (0, 1] or a number of bytes, "
                         f"got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise InvfxError(f"invfx.optimize: a fractional memory_budget must be in (0, 1], got {budget!r} (give bytes "
                         "as an int)")
    if isinstance(budget, int) and budget <= 0:
        raise InvfxError(f"invfx.optimize: memory_budget in bytes must be positive, got {budget!r}")


def _plan_within(optimized, model, inputs, measured, budget, regions, rounds: int):
    """Plan, and with a budget, check the plan by measuring one training step on the example inputs: where
    the measured peak exceeds the budget (the cost model is an estimate), plan again with the chain's budget
    lowered by the excess. Returns the plan and what was measured (None without a budget)."""
    chain = _plan(measured, budget)
    if budget is None:
        return chain, None
    plain = _measure_step(model, inputs)
    target = budget * plain if isinstance(budget, float) else budget
    chain_budget = _chain_budget(budget, measured)
    least = None
    for round_ in range(rounds + 1):
        for cost, mode in zip(measured.costs, chain.modes):
            regions[cost.name].mode = mode
        peak = _measure_step(optimized, inputs)
        if peak <= target:
            return chain, {"plain_bytes": plain, "peak_bytes": peak, "target_bytes": int(target)}
        if chain.modes == getattr(least, "modes", None):
            raise _measured_miss(budget, peak, plain, "the least achievable peak, measured on the example "
                                                      "inputs (the plan of least memory), is")
        if round_ == rounds:
            raise _measured_miss(budget, peak, plain, f"the last of {rounds + 1} plans tried "
                                                      "measures on the example inputs")
        chain_budget -= int(math.ceil(max(peak - target, 0.02 * target)))  # (at least 2%: converge)
        try:
            chain = plan_chain(measured.costs, chain_budget) if chain_budget >= 0 else None
        except BudgetError:
            chain = None
        if chain is None:  # nothing fits the lowered budget: the plan of least memory is the last to try
            chain = least = plan_chain(measured.costs, None)
    raise AssertionError("unreachable")  # (the last round returns or raises)


def _measured_miss(budget, peak: int, plain: int, what: str) -> BudgetError:
    return BudgetError(f"invfx.optimize: memory budget {_budget(budget)} cannot be met: {what} {format_bytes(peak)} "
                       f"({peak} B, {peak / plain:.3f} of plain {format_bytes(plain)}), though the cost model "
                       "estimated less")


def _measure_step(module: nn.Module, inputs) -> int:
    """Peak bytes of one training step of ``module`` on ``inputs`` (:func:`invfx.measure`), leaving parameters'
    gradients, buffers (BatchNorm statistics) and the RNG as they were."""
    from .measure import measure  # (measure reports to a module's plan, which lives here)

    with example_run(module, inputs, keep_grads=True) as copies:
        return measure(module, *copies, steps=1).peak_bytes


def _plan(measured, budget):
    try:
        chain_budget = _chain_budget(budget, measured)
        if chain_budget is not None and chain_budget < 0:
            raise BudgetError("what is kept outside the regions exceeds the budget")
        return plan_chain(measured.costs, chain_budget)
    except BudgetError:
        least = plan_chain(measured.costs, None).peak + measured.outside_bytes
        plain = plain_peak(measured.costs) + measured.outside_bytes
        raise BudgetError(f"invfx.optimize: memory budget {_budget(budget)} cannot be met: the least achievable "
                          f"peak is estimated at {format_bytes(least)} ({least} B, {least / plain:.3f} of plain "
                          f"{format_bytes(plain)}) at the example's size") from None


def _chain_budget(budget, measured) -> int | None:
    """The budget in bytes of the chain of regions: what is saved outside them is the same in every plan."""
    if budget is None:
        return None
    if isinstance(budget, float):
        plain = plain_peak(measured.costs) + measured.outside_bytes
        return int(budget * plain) - measured.outside_bytes
    return budget - measured.outside_bytes


def _rows(names, segments, measured, chosen, blocked, refused, regions, chains, unfused) -> list[PlanRow]:
    """A plan row per segment, in graph order, saying what it keeps, what it costs, why, and which region
    runs it (``region``: its own, or the chain it is a link of)."""
    costs = {c.name: c for c in measured.costs}
    rows = []
    for name, segment in zip(names, segments):
        cost = costs.get(name)
        mode = Mode(chosen.get(name, Mode.KEEP))
        region = regions.get(name)
        error = getattr(region, "reconstruction_error", None)
        risk = None
        if segment.rebuild is not None:
            risk = str(segment.rebuild.risk) + (f", err {error:.1g}" if error is not None else "")
        kept, recompute = 0, 0.0
        if cost is not None:
            kept = {Mode.KEEP: cost.saved_bytes + cost.input_bytes * cost.saves_input,
                    Mode.CHECKPOINT: cost.input_bytes, Mode.INVERTIBLE: 0}[mode]
            recompute = {Mode.KEEP: 0.0, Mode.CHECKPOINT: cost.flops,
                         Mode.INVERTIBLE: cost.flops + (cost.inverse_flops or 0.0)}[mode]
        shown = region.region_name if region is not None and mode != Mode.KEEP else f"({name.split('_', 1)[-1]})"
        runs_in = chains.get(shown, shown) if region is not None and mode != Mode.KEEP else None
        rows.append(PlanRow(
            name=shown, region=runs_in, nodes=len(segment.nodes), mode=mode, kept_bytes=kept,
            recompute_flops=recompute, risk=risk,
            why=_why(name, segment, cost, mode, blocked, refused) + (
                f"; its backward recomputes the region whole ({unfused[runs_in]})" if runs_in in unfused else ""),
            saved_bytes=cost.saved_bytes if cost else None,
            input_bytes=cost.input_bytes if cost else sum(n.meta.get("bytes", 0) for n in segment.inputs),
            flops=cost.flops if cost else None, inverse_flops=cost.inverse_flops if cost else None,
            freed_bytes=sum(n.meta.get("bytes", 0) for n in segment.freeable) if mode == Mode.INVERTIBLE else 0,
            reconstruction_error=error, inputs=[n.name for n in segment.inputs],
            freed=[n.name for n in segment.freeable] if mode == Mode.INVERTIBLE else []))
    return rows


def _why(name, segment, cost, mode, blocked, refused) -> str:
    if name in blocked:
        return f"plain code: {blocked[name]}"
    invertible = segment.mode == Mode.INVERTIBLE
    if name in refused:
        inverse_note = f"not invertible here: {refused[name]}"
    elif invertible:
        rules = sorted({s.rule.name for s in segment.rebuild.steps if s.rule is not None}) or ["recomputation"]
        inverse_note = "rebuilt by " + ", ".join(rules)
    else:
        inverse_note = "no inverse found"
    if cost is None:
        return inverse_note
    allowed = cost.modes
    if mode == Mode.INVERTIBLE:
        extra = (f"; checkpoint would keep {format_bytes(cost.input_bytes)} for +{format_flops(cost.flops)}"
                 if Mode.CHECKPOINT in allowed else "")
        return f"keeps nothing, {inverse_note} (+{format_flops(cost.flops + cost.inverse_flops)} FLOPs){extra}"
    if mode == Mode.CHECKPOINT:
        if Mode.INVERTIBLE in allowed:
            return (f"within the budget for +{format_flops(cost.flops)} FLOPs; invertible would keep nothing for "
                    f"+{format_flops(cost.flops + cost.inverse_flops)}")
        return f"keeps its input only, recomputed for +{format_flops(cost.flops)} FLOPs ({inverse_note})"
    if allowed == frozenset({Mode.KEEP}):
        return f"no other mode allowed ({inverse_note})"
    if cost.saved_bytes + cost.input_bytes * cost.saves_input <= cost.input_bytes:
        return f"saves no more than a checkpoint would keep ({inverse_note})"
    return f"the budget allows it; recomputing would cost +{format_flops(cost.flops)} FLOPs ({inverse_note})"


def _share_everything(optimized: nn.Module, model: nn.Module) -> None:
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
