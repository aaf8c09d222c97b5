"""Pass 2: facts on ``node.meta`` from one run on the example inputs: ``tensor_meta`` (as ShapeProp records it),
``storages`` (the storages the node's tensors use on that run: two values that share one alias each other),
``bytes`` (of the node's tensor outputs) and ``producer`` (what made the value: a function, a method name or a
module type). The run leaves the model as it was: buffers (BatchNorm statistics) and the RNG are restored. A
model that does not run on the example inputs is an :class:`invfx.InvfxError` naming the node, its module and
the reason."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..errors import InvfxError, first_line
from ..graphs import fetch_attr, is_tensor_meta, metas_in, tuple_metas
from ..runtime.storage import storage_key
from .example import example_run

__all__ = ["annotate", "node_bytes", "producer_of", "is_tensor_meta", "tuple_metas", "numel", "fetch_attr"]


class _ExampleRun(fx.Interpreter):
    """ShapeProp's ``tensor_meta`` and ``type``, and each value's storages. Every value is held until the run
    ends (no garbage collection), so no value's memory is reused by another: equal storage keys mean aliasing,
    which is what segments.py needs to know before it frees a value whose view is read later."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module, garbage_collect_values=False)
        self.extra_traceback = False  # (the error names the node itself)

    def run_node(self, node: fx.Node):
        try:
            result = super().run_node(node)
        except Exception as error:  # noqa: BLE001 - the user's model: report which node failed and why
            if not torch.is_grad_enabled() and _runs_with_grad(self, node):
                raise InvfxError(f"invfx.optimize: {_where(node, self.module)} differentiates inside its forward "
                                 f"(torch.autograd.grad: without grad it raises {type(error).__name__}: "
                                 f"{first_line(error)}); invfx runs parts of a model without grad (a checkpoint's "
                                 "forward, the analysis), so it cannot optimize this model") from error
            raise InvfxError(f"invfx.optimize: the model does not run on example_inputs: {_where(node, self.module)} "
                             f"raised {type(error).__name__}: {first_line(error)}") from error
        tensors = []

        def meta(value):
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                return _extract_tensor_metadata(value)
            return value

        metadata = map_aggregate(result, meta)
        if tensors:
            node.meta["tensor_meta"] = metadata
        node.meta["type"] = type(result)
        node.meta["storages"] = frozenset(_storage_keys(tensors))
        return result


def _runs_with_grad(run: fx.Interpreter, node: fx.Node) -> bool:
    """Whether ``node``, which failed under no_grad, runs with grad on (on copies of its tensor arguments)."""
    args, kwargs = run.fetch_args_kwargs_from_env(node)
    args, kwargs = map_aggregate((args, kwargs), lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v)
    try:
        with torch.enable_grad():
            getattr(run, node.op)(node.target, args, kwargs)
    except Exception:  # noqa: BLE001 - it fails either way
        return False
    return True


def _storage_keys(tensors):
    for tensor in tensors:
        try:
            if tensor.untyped_storage().nbytes():
                yield storage_key(tensor)
        except (RuntimeError, NotImplementedError):  # a tensor subclass without storage: nothing to alias
            continue


def _where(node: fx.Node, root: nn.Module) -> str:
    """``node 'stem' (module 'stem', Linear)``, ``node 'add_3' (add in module 'blocks.1')``, or ``node 'linear'
    (linear in Model.forward)``."""
    if node.op == "placeholder":
        return f"input {node.target!r}"
    stack = node.meta.get("nn_module_stack") or {}
    if node.op == "call_module":
        module = stack[next(reversed(stack))][1].__name__ if stack else "module"
        return f"node {node.name!r} (module {node.target!r}, {module})"
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    inside = f" in module {next(reversed(stack.values()))[0]!r}" if stack else f" in {type(root).__name__}.forward"
    return f"node {node.name!r} ({what}{inside})"


def annotate(module: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    _check_arity(module, example_inputs)
    fingerprints = _fingerprints(module)
    with example_run(module, example_inputs) as inputs, torch.no_grad():
        _ExampleRun(module).run(*inputs)
    _check_parameters_unwritten(module, fingerprints)
    for node in module.graph.nodes:
        node.meta["bytes"] = node_bytes(node)
        node.meta["producer"] = producer_of(module, node)


def _fingerprints(module: nn.Module) -> dict[str, tuple]:
    """Each parameter's version and the sums of its values and of their squares: a write through ``.data``
    (FrEIA's ``ActNorm`` initialises itself so) moves no version counter, but changes the sums."""
    def sums(p: torch.Tensor) -> torch.Tensor:
        values = (torch.view_as_real(p) if p.is_complex() else p).double()
        return torch.stack([values.sum(), values.square().sum()])

    with torch.no_grad():
        return {name: (p._version, sums(p)) for name, p in module.named_parameters()}


def _check_parameters_unwritten(module: fx.GraphModule, fingerprints: dict[str, tuple]) -> None:
    """A forward that writes into a parameter (a data-dependent initialisation on the first batch: FrEIA's
    ``ActNorm``) trains differently once invfx has run it on the example: refused, naming the module."""
    now = _fingerprints(module)
    for name, (version, sums) in now.items():
        before = fingerprints.get(name)
        if before is not None and (version != before[0] or
                                   not torch.allclose(sums, before[1], rtol=0, atol=0, equal_nan=True)):
            owner, _, field = name.rpartition(".")
            kind = type(module.get_submodule(owner)).__name__ if owner else type(module).__name__
            raise InvfxError(f"invfx.optimize: module {owner or '(the model)'!r} ({kind}) writes into its parameter "
                             f"{field!r} in its forward (a data-dependent initialisation?), which invfx's run on "
                             "example_inputs has now done; run the model on data once, then optimize it")


def _check_arity(module: fx.GraphModule, example_inputs: Sequence) -> None:
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    if any(str(n.target).startswith("*") for n in placeholders):
        return  # (*args, **kwargs): any number
    names = [str(n.target) for n in placeholders]
    required = sum(1 for n in placeholders if not n.args)  # (a placeholder's args hold its default)
    if not required <= len(example_inputs) <= len(placeholders):
        count = str(required) if required == len(placeholders) else f"{required} to {len(placeholders)}"
        raise InvfxError(f"invfx.optimize: the model's forward takes {count} input{'s' * (len(placeholders) != 1)} "
                         f"({', '.join(names)}); example_inputs has {len(example_inputs)}")


def node_bytes(node: fx.Node) -> int:
    """Bytes of the node's tensor outputs (all items of a tuple)."""
    return sum(math.prod(m.shape) * m.dtype.itemsize for m in metas_in(node.meta.get("tensor_meta")))


def numel(node: fx.Node) -> int:
    """Elements in the node's tensor outputs (all items of a tuple)."""
    return sum(math.prod(m.shape) for m in metas_in(node.meta.get("tensor_meta")))


def producer_of(module: fx.GraphModule, node: fx.Node):
    if node.op == "call_module":
        return type(module.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        return node.target
    return None
