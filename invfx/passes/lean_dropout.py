"""Pass 2c: each ``nn.Dropout`` the graph calls runs as a :class:`~invfx.runtime.dropout_masks.LeanDropout`.

On a CPU, ``F.dropout`` in training is ``x * noise`` (ATen's ``_dropout``), and autograd saves ``noise`` for
backward: a float tensor the size of the activation, in every segment a plan keeps. A LeanDropout draws the same
noise and computes the same values, but saves the mask, one byte an element, and rebuilds the noise from it in
backward (the same gradient, bit for bit): three quarters of each dropout's saved bytes in float32, for a
comparison in forward and a conversion in backward (0.1 ms and 0.06 ms on a million elements, 2-core VM). In a
checkpoint, the same module's mask is recorded at 1 bit as before.

The module it stands for stays the LeanDropout's child and decides ``p``, ``inplace`` and train or eval at each
call; the LeanDropout is a new child of the traced module (``lean_blocks_0_drop``), and the model's own modules
are not touched. Calls of ``F.dropout`` itself and dropouts inside leaf modules are left as they are (a
checkpoint still records their masks).
"""

from __future__ import annotations

import math

import torch.fx as fx
from torch import nn

from ..graphs import is_tensor_meta
from ..runtime.dropout_masks import LeanDropout

__all__ = ["lean_dropouts"]


def lean_dropouts(module: fx.GraphModule) -> dict[str, int]:
    """Call a LeanDropout standing for each ``nn.Dropout`` (not in place, ``p`` in (0, 1)) that ``module``'s
    graph calls; returns, by the name of each LeanDropout, what its calls save at the example's size (bytes: the
    activation less a byte an element). Needs ``tensor_meta`` on the nodes (``annotate``)."""
    standing_for: dict[str, str] = {}
    saved: dict[str, int] = {}
    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        dropout = module.get_submodule(node.target)
        if type(dropout) is not nn.Dropout or dropout.inplace or not 0 < dropout.p < 1:
            continue  # (p = 0 or 1: torch's dropout saves nothing, timm's Dropout(0.0) everywhere among them)
        name = standing_for.get(node.target)
        if name is None:
            name = "lean_" + node.target.replace(".", "_")
            while hasattr(module, name):
                name += "_"
            module.add_submodule(name, LeanDropout(dropout))
            standing_for[node.target] = name
            saved[name] = 0
        node.target = name
        meta = node.meta.get("tensor_meta")
        if is_tensor_meta(meta) and meta.dtype.is_floating_point:
            elements = math.prod(meta.shape)
            saved[name] += elements * (meta.dtype.itemsize - 1)
    if standing_for:
        module.recompile()
    return saved
