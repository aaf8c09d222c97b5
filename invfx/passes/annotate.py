"""Pass 2: facts on ``node.meta`` from one run on the example inputs: ``tensor_meta`` (ShapeProp), ``bytes``
(of the node's tensor outputs) and ``producer`` (what made the value: a function, a method name or a module
type). The run leaves the model as it was: buffers (BatchNorm statistics) and the RNG are restored."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["annotate", "node_bytes", "producer_of", "is_tensor_meta", "tuple_metas", "numel", "fetch_attr"]


def annotate(module: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with torch.no_grad():
            ShapeProp(module).propagate(*example_inputs)
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    for node in module.graph.nodes:
        node.meta["bytes"] = node_bytes(node)
        node.meta["producer"] = producer_of(module, node)


def is_tensor_meta(meta) -> bool:
    """A TensorMetadata (itself a NamedTuple: test for it before testing for tuples of them)."""
    return hasattr(meta, "shape") and hasattr(meta, "dtype")


def tuple_metas(node) -> list | None:
    """The metadata of each item when ``node`` makes a tuple (chunk, split), else None."""
    meta = node.meta.get("tensor_meta")
    if meta is None or is_tensor_meta(meta) or not isinstance(meta, (tuple, list)):
        return None
    return list(meta)


def _metas(meta):
    if meta is None:
        return []
    if is_tensor_meta(meta):
        return [meta]
    if isinstance(meta, (tuple, list)):
        return [m for item in meta for m in _metas(item)]
    if isinstance(meta, dict):
        return [m for item in meta.values() for m in _metas(item)]
    return []


def node_bytes(node: fx.Node) -> int:
    """Bytes of the node's tensor outputs (all items of a tuple)."""
    return sum(math.prod(m.shape) * m.dtype.itemsize for m in _metas(node.meta.get("tensor_meta")))


def numel(node: fx.Node) -> int:
    """Elements in the node's tensor outputs (all items of a tuple)."""
    return sum(math.prod(m.shape) for m in _metas(node.meta.get("tensor_meta")))


def producer_of(module: fx.GraphModule, node: fx.Node):
    if node.op == "call_module":
        return type(module.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        return node.target
    return None


def fetch_attr(module, target: str):
    """The attribute a get_attr or call_module target names (``"blocks.3.weight"``)."""
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value
