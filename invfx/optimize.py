"""``invfx.optimize``: a model written as plain PyTorch, rewritten so that its invertible segments keep nothing
for backward and rebuild their inputs from their outputs instead."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence

import torch
from torch import nn

from .check import check_gradients as check_step
from .errors import InvfxError
from .modes import Mode
from .options import OptimizeOptions
from .passes.infra import Compilation, run_passes
from .passes.pipeline import PIPELINE
from .regions.modules import OptimizedModule
from .report import Plan, PlanRow

__all__ = ["optimize", "OptimizedModule", "Plan", "PlanRow"]  # (Plan lives in report.py; pickles name it here)

MODES = tuple(Mode)
_MODE_NAMES = tuple(m.value for m in Mode)


#: non-tensor arguments an example may hold (``forward(x, scale: float)``): passed through as they are
_SCALARS = (bool, int, float, complex, str, type(None))


def _keyword_inputs(model: nn.Module, example_inputs: dict) -> tuple:
    """A dict example (``{"input_ids": ids, "attention_mask": mask}``, as Hugging Face models are called) as the
    forward's positional arguments: in the forward's order, up to the last one given, with the defaults of
    those left out between (so the model, and the optimized module, take them by position or by name)."""
    parameters = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in parameters]
    unknown = [key for key in example_inputs if key not in names]
    if unknown:
        raise InvfxError(f"invfx.optimize: example_inputs names {', '.join(map(repr, unknown))}, which "
                         f"{type(model).__name__}.forward does not take by position or name ({', '.join(names)})")
    last = max((names.index(key) for key in example_inputs), default=-1)
    inputs = []
    for p in parameters[:last + 1]:
        if p.name not in example_inputs and p.default is p.empty:
            raise InvfxError(f"invfx.optimize: example_inputs leaves out {p.name!r} of {type(model).__name__}."
                             "forward, which has no default")
        inputs.append(example_inputs.get(p.name, p.default))
    return tuple(inputs)


def _check_inputs(model: nn.Module, example_inputs) -> tuple:
    if isinstance(example_inputs, dict):
        example_inputs = _keyword_inputs(model, example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    what = ("invfx.optimize: example_inputs must be a tensor, a tuple of tensors (numbers, strings and None "
            "may stand for non-tensor arguments) or a dict of the forward's arguments by name")
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
    inputs = _check_inputs(model, example_inputs)
    _check_modes(modes)
    _check_leaf_modules(leaf_modules)
    _check_budget(memory_budget)
    _check_not_sharded(model)
    if options is None:
        options = OptimizeOptions()
    elif not isinstance(options, OptimizeOptions):
        raise InvfxError(f"invfx.optimize: options must be an invfx.OptimizeOptions, got {type(options).__name__}")

    state = Compilation(model=model, inputs=inputs, modes=frozenset(Mode(m) for m in modes), budget=memory_budget,
                        options=options, leaf_modules=tuple(leaf_modules))
    run_passes(state, (compilation_pass() for compilation_pass in PIPELINE))
    optimized = state.optimized
    if check_gradients:
        regions_run: dict[str, list[str]] = {}
        for row in optimized.plan.rows:
            if row.mode != Mode.KEEP and row.region:
                regions_run.setdefault(row.region, []).append(row.name)
        optimized.plan.gradient_check = check_step(model, optimized, inputs, regions_run)
    return optimized


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
