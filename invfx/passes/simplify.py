"""Pass 2b: a split of a concatenation gives back the concatenated pieces themselves.

A plainly written coupling stack ends each block with ``torch.cat([y1, y2], -1)`` and starts the next with
``x.chunk(2, -1)``. The pair copies every activation once in forward and once more in backward (the chunk's
gradient is a cat), and hands the next block strided views where the pieces themselves were contiguous. When the
cat is read by that split alone, the split's items are the pieces: the pass reads them from the pieces and drops
both ops. The values are the same (a cat and a split only move elements), and so are the gradients.

It is applied only where the graph proves nobody can tell the difference: the cat's output is read by the split
alone (not an output of the model, not a tensor another op reads), each item the split makes has the shape and
dtype of the piece in its place (no type promotion by the cat, the same cut points), and no item, nor a view of
one, is written in place (a view of the cat shielded the piece from the write; the piece itself does not).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .annotate import is_tensor_meta, tuple_metas
from .segments import _written

__all__ = ["split_through_cat"]

_CATS = {torch.cat, torch.concat, torch.concatenate}
_SPLIT_FUNCTIONS = {torch.chunk: "chunk", torch.split: "split", torch.tensor_split: None}
_SPLIT_METHODS = {"chunk", "split"}


def split_through_cat(module: fx.GraphModule) -> int:
    """Rewrite ``split(cat(pieces, d), ..., d)[i]`` into ``pieces[i]`` where it is safe; the number rewritten.
    Needs ``tensor_meta`` on the nodes (``annotate``)."""
    rewritten = 0
    for split in list(module.graph.nodes):
        pieces = _pieces_through(split)
        if pieces is None:
            continue
        cat = split.args[0]
        for item in list(split.users):
            item.replace_all_uses_with(pieces[item.args[1]])
            module.graph.erase_node(item)
        module.graph.erase_node(split)
        module.graph.erase_node(cat)
        rewritten += 1
    if rewritten:
        module.graph.lint()
        module.recompile()
    return rewritten


def _pieces_through(split: fx.Node) -> list[fx.Node] | None:
    """The cat's pieces, one per item of ``split``, when ``split`` undoes a cat read by nothing else."""
    if not _is_split(split) or not split.args or not isinstance(split.args[0], fx.Node):
        return None
    cat = split.args[0]
    if not (cat.op == "call_function" and cat.target in _CATS and len(cat.users) == 1):
        return None
    pieces = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, fx.Node) for p in pieces):
        return None
    if set(cat.kwargs) - {"tensors", "dim"}:  # out=: the cat writes somewhere
        return None
    cat_dim = _dim(cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0), cat)
    split_dim = _dim(_split_dim(split), cat)
    if cat_dim is None or cat_dim != split_dim:
        return None
    item_metas = tuple_metas(split)
    piece_metas = [p.meta.get("tensor_meta") for p in pieces]
    if item_metas is None or len(item_metas) != len(pieces) or not all(is_tensor_meta(m) for m in piece_metas):
        return None
    for item, piece in zip(item_metas, piece_metas):
        if not is_tensor_meta(item) or tuple(item.shape) != tuple(piece.shape) or item.dtype != piece.dtype:
            return None
    for item in split.users:
        if not (item.op == "call_function" and item.target is operator.getitem and type(item.args[1]) is int):
            return None  # the tuple itself escapes
        if _written(split.graph.owning_module, item, lambda user: True):
            return None  # an item, or a view of it, written in place
    return list(pieces)


def _is_split(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SPLIT_METHODS
    return node.op == "call_function" and node.target in (torch.chunk, torch.split)


def _split_dim(split: fx.Node):
    if "dim" in split.kwargs:
        return split.kwargs["dim"]
    return split.args[2] if len(split.args) > 2 else 0


def _dim(dim, cat: fx.Node) -> int | None:
    meta = cat.meta.get("tensor_meta")
    if type(dim) is not int or not is_tensor_meta(meta):
        return None
    ndim = len(meta.shape)
    return dim + ndim if dim < 0 else dim
