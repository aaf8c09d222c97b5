"""Pass 1 for Hugging Face ``transformers`` models: their graph from ``torch.export`` instead of torch.fx.

torch.fx cannot trace a ``PreTrainedModel``: its forward takes ``**kwargs``, builds attention masks with
``torch.vmap`` and data-dependent checks, and wraps outputs in ``ModelOutput`` objects. transformers' own fx
tracer (``transformers.utils.fx``) is gone from transformers 5 and, in 4.57, no longer traces GPT-2 (its mask
code ``vmap``\\ s over fx proxies). ``torch.export`` is what transformers itself supports and tests (for
ExecuTorch), in both major versions: it runs the forward on fake tensors and records every op that reaches
ATen, with no Python left over. So for a ``PreTrainedModel`` the traced graph is the exported one (its training
IR: ``aten.linear``, ``aten.layer_norm``, ``aten.scaled_dot_product_attention``, ``aten.dropout``, as the model
calls them), with the model's parameters read as ``get_attr`` of their own names, each node's
``nn_module_stack`` kept (segments are named after the blocks they run in), and outputs rebuilt into the
model's ``ModelOutput`` class by the graph's pytree code generator. Facts the passes keep per torch function
hold for these ATen ops through their schemas and tags (``segments.py``, ``rewrite.py``, ``regions/body.py``).

The graph is specialized to the example's shapes (``torch.export`` records ``view(x, [2, 16, 32])``): a guard
node first in the graph checks every call's input shapes and names the difference, rather than letting a view
fail deep inside the model. Nothing here imports transformers: a model is recognized by its class's bases.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

from ..errors import InvfxError, TraceError, first_line

__all__ = ["is_hugging_face_model", "trace_exported", "check_example_shapes"]

# calls of an exported graph that only assert what tracing saw (an input's dtype, its shapes): dropped; the
# shapes are checked once, at the start, by check_example_shapes
_TRACE_ASSERTS = ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size")


def is_hugging_face_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (told by its bases' names: transformers is not
    imported, and need not be installed)."""
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(model).__mro__)


def check_example_shapes(model_name: str, names: tuple[str, ...], shapes: tuple, constants: tuple,
                         *inputs: object) -> None:
    """The exported graph's guard: each input is what the model was optimized with: a tensor of the example's
    shape where ``shapes`` has one, else the example's non-tensor value (``constants``)."""
    for name, shape, constant, value in zip(names, shapes, constants, inputs):
        if shape is not None:
            if not isinstance(value, torch.Tensor):
                raise InvfxError(f"invfx: {model_name} was optimized with a tensor as {name}; it got "
                                 f"{type(value).__name__}: pass it, as in the example")
            if tuple(value.shape) != tuple(shape):
                raise InvfxError(f"invfx: {model_name} was optimized (through torch.export, which specializes a "
                                 f"Hugging Face model's graph to its example's shapes) with {name} of shape "
                                 f"{list(shape)}; it got {list(value.shape)}: optimize it again with an example "
                                 "of that shape")
        elif isinstance(value, torch.Tensor) or value != constant:
            got = type(value).__name__ if isinstance(value, torch.Tensor) else repr(value)
            raise InvfxError(f"invfx: {model_name} was optimized with {name}={constant!r}, which its graph holds "
                             f"as a constant; it got {got}: optimize it again with that argument in the example")


def trace_exported(model: nn.Module, names: Sequence[str], inputs: Sequence[object]) -> fx.GraphModule:
    """``model`` called as ``model(**dict(zip(names, inputs)))``, exported (non-strict), as a GraphModule on
    ``model`` whose forward takes those arguments, by position or by name, and returns what the model returns
    (its ``ModelOutput`` class included)."""
    model_name = type(model).__name__
    kwargs = dict(zip(names, inputs))
    try:
        exported = torch.export.export(model, (), kwargs, strict=False)
        unlifted = exported.module()
    except Exception as error:  # noqa: BLE001 - any failure of torch.export is the model's construct, named
        raise TraceError(f"{model_name} (a Hugging Face model) cannot be traced by torch.export: "
                         f"{type(error).__name__}: {first_line(error)}") from error
    graph = fx.Graph()
    # a non-tensor argument (None for ``cache``) and every one after it may be left out of a call, as the
    # model's own defaults allow: the guard checks that each is what the example had
    first_optional = next((i for i, x in enumerate(inputs) if not isinstance(x, torch.Tensor)), len(inputs))
    placeholders = {name: graph.placeholder(name, **({"default_value": None} if i >= first_optional else {}))
                    for i, name in enumerate(names)}
    shapes = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs)
    constants = tuple(None if isinstance(x, torch.Tensor) else x for x in inputs)
    guard = graph.call_function(check_example_shapes, (model_name, tuple(names), shapes, constants,
                                                       *placeholders.values()))
    guard.meta["invfx_guard"] = True
    env: dict[fx.Node, fx.Node] = {}
    out_spec = None
    for node in unlifted.graph.nodes:
        if node.op == "placeholder":
            if node.name not in placeholders:
                raise TraceError(f"{model_name}: torch.export made an input {node.name!r} that is not one of the "
                                 f"example's keywords ({', '.join(names)})")
            env[node] = placeholders[node.name]
        elif node.op == "call_module" or (node.op == "call_function" and _is_trace_assert(node.target)):
            continue  # (export's own guards module and metadata asserts: see _TRACE_ASSERTS)
        elif node.op == "output":
            graph.output(fx.map_arg(node.args[0], env.__getitem__))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
            env[node].meta = dict(node.meta)
    codegen = unlifted.graph._codegen
    out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
    graph._codegen = OutputTreeCodeGen(_PyTreeInfo(list(names), None, out_spec))
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    graph.lint()
    return fx.GraphModule(model, graph, model_name)


class OutputTreeCodeGen(_PyTreeCodeGen):
    """fx's pytree code generator for the outputs only (the graph returns the model's ``ModelOutput``, rebuilt
    from its flat tensors); the inputs are plain arguments, the trailing ones with defaults."""

    def process_inputs(self, *inputs: object) -> object:
        return CodeGen.process_inputs(self, *inputs)

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False) -> str:
        return CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)


def _is_trace_assert(target) -> bool:
    return getattr(target, "__name__", "").split(".")[0] in _TRACE_ASSERTS


def _is_impure(node: fx.Node) -> bool:
    """What dead-code elimination keeps although nothing reads it: the shape guard and in-place writes (a
    buffer's update)."""
    if node.op in ("placeholder", "output") or "invfx_guard" in node.meta:
        return True
    schema = getattr(node.target, "_schema", None)
    return node.target is operator.setitem or bool(schema is not None and schema.is_mutable)
