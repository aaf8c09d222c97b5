"""``invfx.optimize``: a model written as plain PyTorch, rewritten so that its invertible segments keep nothing
for backward and rebuild their inputs from their outputs instead."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn

from .errors import InvfxError
from .passes import annotate, find_segments, rewrite_segment, trace
from .passes.rewrite import region_name
from .passes.validate import check_reconstruction
from .passes.segments import Segment

__all__ = ["optimize", "OptimizedModule", "Plan"]

MODES = ("keep", "checkpoint", "invertible")


class Plan:
    """The memory plan: a row per segment (name, nodes, mode, bytes, why), plus what could not be traced."""

    def __init__(self, rows: list[dict], opaque: dict[str, str]):
        self.rows = rows
        self.opaque = opaque

    def to_dict(self) -> dict:
        return {"segments": [dict(r) for r in self.rows], "opaque": dict(self.opaque)}

    def __str__(self) -> str:
        headers = ["segment", "nodes", "mode", "input bytes", "freed bytes", "risk", "why"]
        table = [[r["name"], r["nodes"], r["mode"], _size(r["input_bytes"]), _size(r["freed_bytes"]),
                  r["risk"] or "", r["why"]] for r in self.rows]
        text = tabulate(table, headers, tablefmt="github")
        invertible = [r for r in self.rows if r["mode"] == "invertible"]
        text += (f"\n\n{len(invertible)} of {len(self.rows)} segments invertible; "
                 f"{_size(sum(r['freed_bytes'] for r in invertible))} of inputs freed until backward.")
        for name, reason in self.opaque.items():
            text += f"\nnot traced (kept as one opaque module): {name}: {reason}"
        return text

    __repr__ = __str__


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class OptimizedModule(fx.GraphModule):
    """A GraphModule that shares the original model's parameters and buffers (same ``state_dict`` keys) and
    runs its invertible segments as invfx regions. ``plan`` describes the segments."""

    plan: Plan


def _check_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        return tuple(example_inputs)
    raise InvfxError("invfx.optimize: example_inputs must be a tensor or a tuple of tensors, got "
                     f"{type(example_inputs).__name__}")


def optimize(model: nn.Module, example_inputs, *, memory_budget=None, modes: Sequence[str] = MODES,
             leaf_modules: Sequence[type | nn.Module] = ()) -> OptimizedModule:
    """Rewrite ``model`` (unchanged itself) so that its invertible segments free their inputs in forward and
    rebuild them in backward. Returns a GraphModule sharing ``model``'s parameters and buffers."""
    if not isinstance(model, nn.Module):
        raise InvfxError(f"invfx.optimize: model must be an nn.Module, got {type(model).__name__}")
    inputs = _check_inputs(example_inputs)
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise InvfxError(f"invfx.optimize: unknown modes {sorted(unknown)}; choose from {MODES}")
    if memory_budget is not None:
        raise InvfxError("invfx.optimize: memory_budget needs the planner (not available yet); leave it None")

    traced, opaque = trace(model, leaf_modules)
    annotate(traced, inputs)
    segments = find_segments(traced, modes)
    taken: set[str] = set()
    names = [region_name(traced, s.nodes, i, taken) if s.mode == "invertible" else f"keep_{i}"
             for i, s in enumerate(segments)]
    rows = [_row(name, segment) for name, segment in zip(names, segments)]
    # Last segment first: a rewrite replaces a segment's outputs in the graph, and only later segments read
    # them; earlier segments, still to be rewritten, keep referring to nodes that are still there.
    for name, segment in reversed(list(zip(names, segments))):
        if segment.mode == "invertible":
            rewrite_segment(traced, segment, name)
    traced.graph.lint()
    optimized = OptimizedModule(traced, traced.graph, type(model).__name__)
    _share_everything(optimized, model)
    for name, reason in check_reconstruction(optimized, inputs).items():
        for row in rows:
            if row["name"] == name:
                row.update(mode="keep", freed_bytes=0, why=f"not invertible here: {reason}")
    optimized.plan = Plan(rows, opaque)
    optimized.train(model.training)
    return optimized


def _row(name: str, segment: Segment) -> dict:
    input_bytes = sum(n.meta.get("bytes", 0) for n in segment.inputs)
    freed = sum(n.meta.get("bytes", 0) for n in segment.freeable) if segment.mode == "invertible" else 0
    return {"name": name, "nodes": len(segment.nodes), "mode": segment.mode, "input_bytes": input_bytes,
            "freed_bytes": freed, "risk": str(segment.rebuild.risk) if segment.rebuild else None,
            "why": segment.why, "inputs": [n.name for n in segment.inputs],
            "kept": [n.name for n in segment.kept], "freed": [n.name for n in segment.freeable]}


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
    optimized._buffers.clear()
    optimized._buffers.update(model._buffers)
    optimized._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
