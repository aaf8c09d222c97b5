"""Pass 1: trace a model with torch.fx, keeping what cannot be traced as opaque leaves.

invfx.nn modules and the user's ``leaf_modules`` are leaves (called as a whole, recomputed as a whole); torch.nn
layers are leaves as fx makes them. A submodule whose forward cannot be traced (data-dependent control flow,
unsupported Python) is rolled back and kept as an opaque leaf; the reason is recorded, and the plan reports it.
Only when the root's own forward cannot be traced is it an error.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.amp.autocast_mode import autocast
from torch.autograd import grad_mode
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.node import has_side_effect

from ..errors import InvfxError, TraceError, first_line
from ..nn.module import Module as InvertibleModule
from ..runtime.grad_mode import enter_grad_mode, exit_grad_mode
from .exported import is_hugging_face_model, trace_exported

__all__ = ["trace", "InvfxTracer", "MODE_SWITCHES"]

#: the calls a traced graph switches grad mode or autocast with (never inside a region: see segments.py)
MODE_SWITCHES = frozenset({enter_grad_mode, exit_grad_mode, grad_mode._enter_inference_mode,
                           grad_mode._exit_inference_mode, torch.amp._enter_autocast, torch.amp._exit_autocast})
for _switch in MODE_SWITCHES:
    has_side_effect(_switch)  # (no dead-code pass may drop one: its result is read only by its exit)


class InvfxTracer(fx.Tracer):
    def __init__(self, leaf_modules: Iterable[type | nn.Module] = ()):
        super().__init__()
        # Buffers read as attributes are traced as get_attr nodes, not used as the tensors they are: an in-place
        # update of one (timm's BatchNormAct2d counts ``num_batches_tracked.add_(1)`` itself) ran once while
        # tracing, on the model's own buffer, and was missing from the graph, so the optimized model never
        # counted a batch and optimize had changed the model
        self.proxy_buffer_attributes = True
        leaf_modules = tuple(leaf_modules)
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_instances = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}
        self.opaque: dict[str, str] = {}  # qualified name -> why it could not be traced

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        # (a region of a model optimized before, inside this one, runs as it was planned)
        if isinstance(m, InvertibleModule) or id(m) in self.leaf_instances or qualified_name in self.opaque or \
                getattr(type(m), "invfx_region", False):
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


@contextlib.contextmanager
def _recording_mode_switches(tracer: fx.Tracer):
    """While tracing, record the context managers the model enters and leaves that switch grad mode
    (``torch.no_grad``, ``enable_grad``, ``set_grad_enabled``, ``inference_mode``, as ``with`` or decorator) or
    autocast (``torch.autocast``) as graph calls: fx would run them at trace time and record nothing. Each still
    switches at trace time too; the switches they make through one another (``no_grad`` calls
    ``set_grad_enabled``) are recorded once."""
    depth = [0]

    def recording(original, record):
        def method(self, *args):
            if depth[0]:
                return original(self, *args)
            depth[0] += 1
            try:
                result = original(self, *args)
                record(self, *args)
            finally:
                depth[0] -= 1
            return result
        return method

    def enter(function, mode_of, name):
        def record(manager, *args):
            # (autocast's arguments: its device, dtype and flags, as torch.amp._enter_autocast takes them)
            arguments = (mode_of(manager, *args),) if mode_of is not None else \
                (manager.device, manager.fast_dtype, manager._enabled, manager._cache_enabled)
            manager._invfx_switch = tracer.create_proxy("call_function", function, arguments, {}, name=name)
        return record

    def leave(function):
        def record(manager, *args):
            switch = getattr(manager, "_invfx_switch", None)
            if switch is not None:
                tracer.create_proxy("call_function", function, (switch,), {})
        return record

    patches = [
        (grad_mode.no_grad, "__enter__", enter(enter_grad_mode, lambda m: False, "no_grad")),
        (grad_mode.no_grad, "__exit__", leave(exit_grad_mode)),
        (grad_mode.enable_grad, "__enter__", enter(enter_grad_mode, lambda m: True, "enable_grad")),
        (grad_mode.enable_grad, "__exit__", leave(exit_grad_mode)),
        # set_grad_enabled switches when made (it works as a plain call too); leaving a ``with`` switches back
        (grad_mode.set_grad_enabled, "__init__", enter(enter_grad_mode, lambda m, mode: mode, "set_grad_enabled")),
        (grad_mode.set_grad_enabled, "__exit__", leave(exit_grad_mode)),
        (grad_mode.inference_mode, "__enter__", enter(grad_mode._enter_inference_mode, lambda m: m.mode,
                                                      "inference_mode")),
        (grad_mode.inference_mode, "__exit__", leave(grad_mode._exit_inference_mode)),
        (autocast, "__enter__", enter(torch.amp._enter_autocast, None, "autocast")),
        (autocast, "__exit__", leave(torch.amp._exit_autocast)),
    ]
    originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    try:
        for (cls, name, record), (_, _, original) in zip(patches, originals):
            setattr(cls, name, recording(original, record))
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


def _defaults_not_given(model: nn.Module, num_inputs: int | None) -> dict[str, object]:
    """The forward's parameters after the ``num_inputs`` given that have defaults: traced as those constants
    (``forward(x, mask=None)`` with only ``x``: ``x * mask`` would be traced as a product of two inputs and fail
    on the example). A parameter without a default that is not given is an error naming it."""
    if num_inputs is None:
        return {}
    parameters = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [p.name for p in parameters[num_inputs:] if p.default is p.empty]
    if missing:
        raise InvfxError(f"invfx.optimize: {type(model).__name__}.forward needs {', '.join(missing)}, which "
                         f"example_inputs ({num_inputs} given) does not hold; pass every argument without a default, "
                         "in order")
    return {p.name: p.default for p in parameters[num_inputs:]}


def trace(model: nn.Module, leaf_modules: Iterable[type | nn.Module] = (), num_inputs: int | None = None,
          example_inputs: Sequence[object] | None = None) -> tuple[fx.GraphModule, dict[str, str], dict[str, object]]:
    """``model`` as a GraphModule sharing its parameters, the opaque submodules with the reasons, and the
    forward's parameters traced as constants (those with defaults after the ``num_inputs`` given). A Hugging
    Face model (``transformers.PreTrainedModel``), which torch.fx cannot trace, is exported instead
    (``exported.py``; that needs ``example_inputs``)."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"invfx.optimize needs an nn.Module, got {type(model).__name__}")
    if is_hugging_face_model(model) and example_inputs is not None:
        return _trace_hugging_face(model, tuple(leaf_modules), example_inputs)
    tracer = InvfxTracer(leaf_modules)
    attributes = set(vars(model))
    constants = _defaults_not_given(model, num_inputs)
    try:
        with _recording_mode_switches(tracer):
            graph = tracer.trace(model, concrete_args=constants or None)
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
    if constants:
        _guards_first(module.graph)
        module.recompile()
    return module, dict(tracer.opaque), constants


def _trace_hugging_face(model: nn.Module, leaf_modules: tuple, example_inputs: Sequence[object]
                        ) -> tuple[fx.GraphModule, dict[str, str], dict[str, object]]:
    """A ``PreTrainedModel`` through torch.export, its forward's first ``len(example_inputs)`` parameters given
    (optimize puts a dict example in that order)."""
    if leaf_modules:
        raise InvfxError(f"invfx.optimize: leaf_modules cannot be kept whole in {type(model).__name__}: a Hugging "
                         "Face model is traced by torch.export, which records the ops inside every module")
    constants = _defaults_not_given(model, len(example_inputs))
    parameters = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return trace_exported(model, parameters[:len(example_inputs)], example_inputs), {}, constants


def _guards_first(graph: fx.Graph) -> None:
    """fx checks at each call that a parameter traced as a constant still has that value (``_assert_is_none``,
    ``torch._assert(mask_1 == 2.0)``), between the placeholders. Every placeholder goes first, then the checks
    (each marked ``invfx_guard``: no region holds one), then the model's nodes."""
    nodes = list(graph.nodes)
    guards = [n for n in nodes if n.op == "call_function" and n.target in (_assert_is_none, torch._assert)]
    pending = list(guards)
    while pending:  # (and what computes their conditions: ``mask_1 == 2.0``)
        node = pending.pop()
        node.meta["invfx_guard"] = True
        pending.extend(a for a in node.all_input_nodes if a.op != "placeholder" and "invfx_guard" not in a.meta)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    anchor = next(n for n in nodes if n.op != "placeholder" and "invfx_guard" not in n.meta)
    for node in placeholders + [n for n in nodes if "invfx_guard" in n.meta]:
        anchor.prepend(node)
    graph.lint()

