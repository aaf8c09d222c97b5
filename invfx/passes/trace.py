"""Pass 1: trace a model with torch.fx, keeping what cannot be traced as opaque leaves.

invfx.nn modules and the user's ``leaf_modules`` are leaves (called as a whole, recomputed as a whole); torch.nn
layers are leaves as fx makes them. A submodule whose forward cannot be traced (data-dependent control flow,
unsupported Python) is rolled back and kept as an opaque leaf; the reason is recorded, and the plan reports it.
Only when the root's own forward cannot be traced is it an error.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from ..errors import TraceError, first_line
from ..nn.module import Module as InvertibleModule

__all__ = ["trace", "InvfxTracer"]


class InvfxTracer(fx.Tracer):
    def __init__(self, leaf_modules: Iterable[type | nn.Module] = ()):
        super().__init__()
        leaf_modules = tuple(leaf_modules)
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_instances = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}
        self.opaque: dict[str, str] = {}  # qualified name -> why it could not be traced

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if isinstance(m, InvertibleModule) or id(m) in self.leaf_instances or qualified_name in self.opaque:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev  # the newest node so far
        stack = dict(self.module_stack)
        calls = dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:  # noqa: BLE001 - any failure inside makes the submodule opaque
            # roll back the nodes traced inside the failed submodule, newest first (their users go before them)
            while self.graph._root.prev is not last:
                self.graph.erase_node(self.graph._root.prev)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            self.opaque[name] = f"{type(error).__name__}: {first_line(error)}"
            return super().call_module(m, forward, args, kwargs)


def trace(model: nn.Module, leaf_modules: Iterable[type | nn.Module] = ()) -> tuple[fx.GraphModule, dict[str, str]]:
    """``model`` as a GraphModule sharing its parameters, and the opaque submodules with the reasons."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"invfx.optimize needs an nn.Module, got {type(model).__name__}")
    tracer = InvfxTracer(leaf_modules)
    attributes = set(vars(model))
    try:
        graph = tracer.trace(model)
        module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as error:  # noqa: BLE001
        raise TraceError(f"{type(model).__name__} (the root module) cannot be traced by torch.fx: "
                         f"{type(error).__name__}: {first_line(error)}") from error
    finally:
        # fx stores a tensor made in forward (``torch.tensor(2.0)``) on the model as ``_tensor_constant0``: the
        # GraphModule has its own reference; the model is left as it was
        for name in set(vars(model)) - attributes:
            if name.startswith("_tensor_constant"):
                delattr(model, name)
    return module, dict(tracer.opaque)

