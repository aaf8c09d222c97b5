"""What a region's bodies hold besides the model's own modules: registry inverses and RNG marks as modules, and
the graphs in a form that pickles."""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graphs import fetch_attr
from ..runtime import dropout_masks, norm_stats, rng_mark
from ..runtime.branches import close_scope
from ..runtime.dropout_masks import DROPOUT_FUNCTIONS
from ..runtime.stash import EXPENSIVE_OPS, stash_begin, stash_end

__all__ = ["Inverse", "RngMark", "ShapeMeta", "is_rng_mark", "portable_graph", "named_objects", "keeps_output",
           "may_drop", "marked_body", "dropouts_called_directly", "norms_called_directly", "calls_batch_norm",
           "updated_buffers"]

# What a selective checkpoint keeps the outputs of: the calls that run convolutions, matrix products and
# attention (invfx.runtime.stash.EXPENSIVE_OPS are the aten ops they run)
_EXPENSIVE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                      nn.Linear, nn.Bilinear, nn.MultiheadAttention)
_EXPENSIVE_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                        F.linear, F.bilinear, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm,
                        torch.addmm, torch.baddbmm, torch.einsum, torch.conv1d, torch.conv2d, torch.conv3d,
                        operator.matmul}
_EXPENSIVE_METHODS = {"matmul", "mm", "bmm", "addmm", "baddbmm", "__matmul__"}
_EXPENSIVE_ATEN = EXPENSIVE_OPS | {torch.ops.aten.linear, torch.ops.aten.matmul, torch.ops.aten.conv1d,
                                   torch.ops.aten.conv2d, torch.ops.aten.conv3d, torch.ops.aten.einsum,
                                   torch.ops.aten.scaled_dot_product_attention}


def keeps_output(root: nn.Module, node: fx.Node) -> bool:
    """Whether a selective checkpoint keeps what ``node`` runs (a convolution, matrix product or attention)."""
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _EXPENSIVE_MODULES)
    if node.op == "call_function":
        # (an exported graph's ATen ops, exported.py: aten.linear and aten.scaled_dot_product_attention as the
        # model called them, or the ops they decompose into)
        return node.target in _EXPENSIVE_FUNCTIONS or getattr(node.target, "overloadpacket", None) in _EXPENSIVE_ATEN
    if node.op == "call_method":
        return node.target in _EXPENSIVE_METHODS
    return False


# Functions that update running statistics passed to them (positions of those arguments) when training: a
# BatchNorm traced through (timm's BatchNormAct2d, a model calling F.batch_norm on its own buffers)
_UPDATES_ARGUMENTS = {F.batch_norm: (1, 2), torch.batch_norm: (3, 4), F.instance_norm: (1, 2),
                      torch.instance_norm: (3, 4)}


def updated_buffers(body: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """The tensors of ``body``'s attributes (buffers read by ``get_attr``) that its calls update in place: passed
    as running statistics to a batch or instance norm, or written by an in-place method or an op whose schema
    writes that argument. A recomputation must not update them a second time, and a kernel's own update bumps
    no version counter, so the graph says which they are."""
    found: dict[int, torch.Tensor] = {}

    def note(value: object) -> None:
        if isinstance(value, fx.Node) and value.op == "get_attr":
            tensor = fetch_attr(body, value.target)
            if isinstance(tensor, torch.Tensor) and not isinstance(tensor, nn.Parameter):
                found.setdefault(id(tensor), tensor)

    for node in body.graph.nodes:
        if node.op == "call_function" and node.target in _UPDATES_ARGUMENTS:
            for position in _UPDATES_ARGUMENTS[node.target]:
                note(node.args[position] if position < len(node.args) else None)
            note(node.kwargs.get("running_mean"))
            note(node.kwargs.get("running_var"))
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__") and node.args:
            note(node.args[0])
        elif node.op == "call_function" and getattr(node.target, "_schema", None) is not None:
            for argument, value in zip(node.target._schema.arguments, node.args):
                if argument.alias_info is not None and argument.alias_info.is_write:
                    note(value)
    return tuple(found.values())


# Code whose calls never run a dropout: torch's own functions and ops, Python's operators and builtins, invfx's
# markers. A call of anything else (a function the tracer did not enter) may.
_NO_DROPOUT_MODULES = ("torch", "_operator", "operator", "builtins", "math", "invfx")


def may_drop(root: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` may run a dropout whose mask a checkpoint records (``invfx.runtime.dropout_masks``): a
    dropout call, a module holding an ``nn.Dropout``, or code the tracer did not enter (a leaf module of the
    user's, a wrapped function), which may call ``F.dropout`` itself. A region none of whose nodes may does not
    put the record's torch-function mode around its forward and recomputation (a Python round trip per torch
    call: 1.1 ms of a 33 ms step on a ResNet of 16 checkpointed blocks)."""
    if node.op == "call_function":
        return node.target in DROPOUT_FUNCTIONS or not (
            isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
            or getattr(node.target, "__module__", "").startswith(_NO_DROPOUT_MODULES))
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()) or \
            not type(module).__module__.startswith(_NO_DROPOUT_MODULES)
    return False


def marked_body(body: fx.GraphModule, calls: Collection[str] | None = None) -> fx.GraphModule:
    """``body`` with ``stash_begin()`` / ``stash_end()`` around each call whose outputs a selective checkpoint
    keeps: those of ``calls`` (node names; None: all) that may be kept (:func:`keeps_output`). The stash's
    dispatch mode runs there only; every other call runs again in the recomputation."""
    graph = fx.Graph(tracer_cls=body.graph._tracer_cls)
    env: dict[fx.Node, fx.Node] = {}
    for node in body.graph.nodes:
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], env.__getitem__))
            break
        kept = keeps_output(body, node) and (calls is None or node.name in calls)
        mode = graph.call_function(stash_begin, ()) if kept else None
        env[node] = graph.node_copy(node, env.__getitem__)
        if kept:
            graph.call_function(stash_end, (mode,))
    return fx.GraphModule(body, graph, type(body).__name__)


def dropouts_called_directly(body: fx.GraphModule) -> fx.GraphModule | None:
    """``body`` with each dropout it runs called through :func:`invfx.runtime.dropout_masks.dropout` (or
    ``module_dropout`` for an ``nn.Dropout``), which records and replays its mask without a torch-function mode
    around the whole body (``Region(dropouts_marked=True)``). None where some call may run a dropout the graph
    does not show (:func:`may_drop`: a leaf module of the user's, a function the tracer did not enter): that
    body needs the mode. ``body`` itself where it runs no dropout."""
    rewrites: dict[fx.Node, tuple[object, tuple, dict, str | None]] = {}
    for node in body.graph.nodes:
        if not may_drop(body, node):
            continue
        args, kwargs = node.args, dict(node.kwargs)
        if node.op == "call_function" and node.target is F.dropout:
            rewrites[node] = (dropout_masks.dropout, args, kwargs, None)
        elif node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
            if "train" in kwargs:  # (aten's name for F.dropout's ``training``)
                kwargs["training"] = kwargs.pop("train")
            rewrites[node] = (dropout_masks.dropout, args, kwargs, None)
        elif node.op == "call_module" and type(body.get_submodule(node.target)) is dropout_masks.LeanDropout:
            continue  # (calls the record itself)
        elif node.op == "call_module" and type(body.get_submodule(node.target)) is nn.Dropout \
                and len(args) + len(kwargs) == 1:
            rewrites[node] = (dropout_masks.module_dropout, tuple(args) + tuple(kwargs.values()), {}, node.target)
        else:
            return None
    return _calls_replaced(body, rewrites) if rewrites else body


def _calls_replaced(body: fx.GraphModule, rewrites: dict[fx.Node, tuple[object, tuple, dict, str | None]]
                    ) -> fx.GraphModule:
    """``body`` with each node of ``rewrites`` (``{node: (function, args, kwargs, module)}``) calling
    ``function(*args, **kwargs)`` instead, under its own name, with ``module`` (a submodule's target), where
    given, read by a ``get_attr`` and passed first: the module itself, whose flags are read at the call."""
    graph = fx.Graph(tracer_cls=body.graph._tracer_cls)
    env: dict[fx.Node, fx.Node] = {}
    for node in body.graph.nodes:
        if node not in rewrites:
            env[node] = graph.node_copy(node, env.__getitem__)
            continue
        function, args, kwargs, module = rewrites[node]
        args, kwargs = fx.map_arg(args, env.__getitem__), fx.map_arg(kwargs, env.__getitem__)
        if module is not None:
            args = (graph.create_node("get_attr", module, name=f"{node.name}_module"),) + tuple(args)
        env[node] = graph.create_node("call_function", function, args, kwargs, name=node.name)
        env[node].meta = dict(node.meta)
    return fx.GraphModule(body, graph, type(body).__name__)


def norms_called_directly(body: fx.GraphModule) -> tuple[fx.GraphModule, bool]:
    """``body`` with each ``nn.BatchNorm1d/2d/3d`` it calls (exactly those types, one argument) called through
    :func:`invfx.runtime.norm_stats.module_batch_norm`, and each ``F.batch_norm`` through
    :func:`~invfx.runtime.norm_stats.batch_norm`, whose batch statistics a checkpoint keeps from its
    forward for its recomputation (``Region(norms_marked=True)``); and whether it calls any. Other calls are left
    as they are: a BatchNorm the graph does not show measures again when recomputed, as before."""
    rewrites: dict[fx.Node, tuple[object, tuple, dict, str | None]] = {}
    for node in body.graph.nodes:
        kind = calls_batch_norm(body, node)
        if kind == "module":
            rewrites[node] = (norm_stats.module_batch_norm, node.args, {}, node.target)
        elif kind == "function":
            rewrites[node] = (norm_stats.batch_norm, node.args, dict(node.kwargs), None)
    return (_calls_replaced(body, rewrites), True) if rewrites else (body, False)


def calls_batch_norm(root: nn.Module, node: fx.Node) -> str | None:
    """``"module"`` where ``node`` calls an ``nn.BatchNorm1d/2d/3d`` (exactly, one argument), ``"function"``
    where it calls ``F.batch_norm`` (code the tracer went through: timm's ``BatchNormAct2d``): the calls whose
    batch statistics a checkpoint keeps (:func:`norms_called_directly`); else None."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs \
            and type(root.get_submodule(node.target)) in norm_stats.RECORDED_MODULES:
        return "module"
    if node.op == "call_function" and node.target is F.batch_norm:
        return "function"
    return None


class Inverse(nn.Module):
    """A registry inverse called from a rebuild body. A module, not a function call: fx re-traces a body's
    code when it is unpickled (torch.load), and would trace into the inverse's Python instead of calling it."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"


class RngMark(nn.Module):
    """``rng_mark(name)`` in a body, as a module for the same reason (a call with constant arguments would run
    during the re-trace instead of being recorded). ``RngMark(None)`` (``end_<node>`` in a body) closes the scope
    of the mark before it: what runs after the marked node (an inverted leaky_relu, a registry inverse) is no
    sub-network's, and neither recorded nor replayed."""

    def __init__(self, mark: str | None):
        super().__init__()
        self.mark = mark

    def forward(self):
        if self.mark is None:
            close_scope()
        else:
            rng_mark(self.mark)

    def extra_repr(self) -> str:
        return repr(self.mark)


class ShapeMeta(tuple):
    """Shape and dtype of a value, standing in for fx's TensorMetadata in pickled bodies."""

    def __new__(cls, shape, dtype):
        return super().__new__(cls, (tuple(shape), dtype))

    def __getnewargs__(self):
        return tuple(self)

    shape = property(lambda self: self[0])
    dtype = property(lambda self: self[1])


def portable_graph(graph: fx.Graph, keep: Sequence[str]) -> fx.Graph:
    """A copy of ``graph`` whose nodes keep only the ``keep`` meta, in a form that pickles."""
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        env[node] = copy.node_copy(node, lambda n: env[n])
        env[node].meta = {k: _portable(node.meta[k]) for k in keep if k in node.meta}
    return copy


def named_objects(body: fx.GraphModule) -> dict:
    """The modules and tensors a body's call_module and get_attr nodes name."""
    from ..graphs import fetch_attr

    return {n.target: body.get_submodule(n.target) if n.op == "call_module" else fetch_attr(body, n.target)
            for n in body.graph.nodes if n.op in ("call_module", "get_attr")}


def _portable(value):
    """Node meta that pickles (TensorMetadata carries a memory format, which does not under torch.save)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return ShapeMeta(value.shape, value.dtype)
    if isinstance(value, (tuple, list)) and not isinstance(value, ShapeMeta):
        return type(value)(_portable(v) for v in value) if type(value) in (tuple, list) else value
    return value


def is_rng_mark(body: nn.Module, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(body.get_submodule(node.target), RngMark)
