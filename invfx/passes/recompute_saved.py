"""Pass 3b (after the segments are found): a LayerNorm's or GELU's output that only ``nn.Linear`` calls of its
segment read is saved by them as how to recompute it (:class:`~invfx.runtime.recompute_saved.RecomputedInput`).

Each such Linear call becomes a call of a RecomputedInput standing for it, given the output and the
LayerNorm's or GELU's input: ``fc2(gelu)`` becomes ``recompute_blocks_0_mlp_2(gelu, fc1)``. The output is then
kept by nobody (its producer saves its input, which autograd keeps anyway), and backward rebuilds it with one
LayerNorm or GELU. On the benchmark transformer that is 6 of the 18 MiB a block keeps, for about 1 ms of its
backward. Left as it is in invertible segments (their regions recompute sub-networks in backward anyway), where
the output or the input is written in place, where anything but a plain one-argument Linear call of the same
segment reads the output, or where the op is called with other arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
from torch import nn

from ..graphs import is_tensor_meta
from ..runtime.recompute_saved import RecomputedInput
from .segments import _written

__all__ = ["recompute_saved_inputs", "PRODUCERS"]

#: the modules whose output is rebuilt from their input: deterministic, cheap, and saving their input themselves
PRODUCERS = (nn.LayerNorm, nn.GELU)


def recompute_saved_inputs(module: fx.GraphModule,
                           together: Callable[[fx.Node, fx.Node], bool] = lambda a, b: True) -> dict[str, int]:
    """Rewrite ``module``'s graph as the module docstring says, where ``together(producer, reader)`` (the
    pipeline: both in one segment that is not invertible; an invertible region recomputes its sub-networks in
    backward anyway, and there a rebuild would only add a transient); returns, by the name of each
    RecomputedInput made, the bytes of the output it no longer keeps at the example's size (each output counted
    once, under its first reader's name). Needs ``tensor_meta`` on the nodes (``annotate``). Changes calls in
    place: no node is added, removed or moved."""
    saved: dict[str, int] = {}
    for producer in list(module.graph.nodes):
        readers = _readers(module, producer)
        if not readers or not all(together(producer, r) for r in readers):
            continue
        source = producer.args[0]
        for n, reader in enumerate(readers):
            name = "recompute_" + reader.target.replace(".", "_")
            while hasattr(module, name):
                name += "_"
            module.add_submodule(name, RecomputedInput(module.get_submodule(reader.target),
                                                       module.get_submodule(producer.target), name))
            reader.target, reader.args = name, (producer, source)
            saved[name] = producer.meta["bytes"] if n == 0 else 0
    if saved:
        module.graph.lint()
        module.recompile()
    return saved


def _readers(module: fx.GraphModule, producer: fx.Node) -> list[fx.Node]:
    """The Linear calls reading ``producer``'s output, where all its readers are such calls and it may be
    rebuilt; else none."""
    if producer.op != "call_module" or type(module.get_submodule(producer.target)) not in PRODUCERS:
        return []
    if len(producer.args) != 1 or producer.kwargs or not isinstance(producer.args[0], fx.Node):
        return []
    source = producer.args[0]
    if not (is_tensor_meta(producer.meta.get("tensor_meta")) and is_tensor_meta(source.meta.get("tensor_meta"))):
        return []
    readers = list(producer.users)
    if not readers or not all(r.op == "call_module" and type(module.get_submodule(r.target)) is nn.Linear
                              and r.args == (producer,) and not r.kwargs for r in readers):
        return []
    if _written(module, producer, lambda user: True) or _written(module, source, lambda user: True):
        return []
    return readers
