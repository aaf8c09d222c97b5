"""Small helpers of the InvTorch API."""

from __future__ import annotations

import builtins
from collections.abc import Iterable

import torch

__all__ = ["requires_grad", "pack"]


def _flatten(items) -> Iterable:
    if isinstance(items, torch.Tensor) or items is None:
        yield items
    elif isinstance(items, (tuple, list)):
        for item in items:
            yield from _flatten(item)
    else:
        yield items


def _requires(item) -> bool:
    return isinstance(item, torch.Tensor) and item.requires_grad


def requires_grad(inputs=None, *, any=None, all=None) -> bool:  # noqa: A002 - the seed API's names
    """Whether tensors require grad, and (the ``strict`` contract) mark outputs accordingly.

    ``requires_grad(t)``: ``t`` is a tensor that requires grad (for a tuple: any of them does).
    ``requires_grad(outputs, any=(x, w), all=...)``: ``requires`` is True when any tensor in ``any`` requires
    grad (and every tensor in ``all`` does); each output tensor that is a leaf is set to it; returns ``requires``.
    Non-leaf outputs (a function run with grad on) already carry the right flag and are left alone.
    """
    if any is None and all is None:
        return builtins.any(_requires(t) for t in _flatten(inputs))
    requires = (any is None or builtins.any(_requires(t) for t in _flatten(any))) and \
        (all is None or builtins.all(_requires(t) for t in _flatten(all)))
    for tensor in _flatten(inputs):
        if isinstance(tensor, torch.Tensor) and tensor.is_leaf and (tensor.is_floating_point() or
                                                                   tensor.is_complex() or not requires):
            tensor.requires_grad_(requires)
    return requires


def pack(outputs) -> tuple:
    """A function's result as a tuple (a lone tensor becomes a 1-tuple)."""
    if isinstance(outputs, tuple):
        return outputs
    if isinstance(outputs, list):
        return tuple(outputs)
    return (outputs,)
