"""Grafting: reuse a sub-network's evaluation from the rebuild for the gradient.

A fused replay runs a sub-network before the leaf of its input exists (the input is rebuilt from the
sub-network's own output: ``x1 = y1 - F(x2)``). It runs it once, with grad, on *stand-in* leaves holding the
values of its inputs. :func:`graft` then hands those outputs on as functions of the real tensors the stand-ins
stood for: its backward differentiates the sub-network's graph once, passing the stand-ins' gradients to the
real tensors and the parameters' gradients to the parameters. Each sub-network thus runs once in backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from ..errors import RegionError
from .state import hooks_silenced

__all__ = ["graft", "stand_in"]


def stand_in(value: torch.Tensor) -> torch.Tensor:
    """A leaf with ``value``'s values, to run a sub-network on before the real input exists."""
    leaf = value.detach()
    return leaf.requires_grad_() if leaf.is_floating_point() or leaf.is_complex() else leaf


class _Box:
    """Holds the sub-network's graph for :class:`_Graft` without making it an input of the node."""

    __slots__ = ("outputs", "stand_ins", "params")

    def __init__(self, outputs: list[torch.Tensor], stand_ins: list[torch.Tensor],
                 params: list[torch.Tensor]) -> None:
        self.outputs, self.stand_ins, self.params = outputs, stand_ins, params


class _Graft(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, box: _Box, *attach_and_params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.box = box
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in box.outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RegionError("double backward through a fused invfx region is not supported")
        box, ctx.box = ctx.box, None
        if box is None:  # (its graph was differentiated and let go by a first backward: None would be wrong)
            raise RegionError("backward through a fused invfx sub-network a second time: its graph was used and "
                              "freed by the first backward")
        count = len(box.stand_ins)
        needs = ctx.needs_input_grad[1:]
        result: list[torch.Tensor | None] = [None] * (count + len(box.params))
        roots = [(o, g) for o, g in zip(box.outputs, grads) if g is not None and o.requires_grad]
        wanted = [i for i, need in enumerate(needs)
                  if need and (i >= count or box.stand_ins[i].requires_grad)]
        if roots and wanted:
            wrt = [box.stand_ins[i] if i < count else box.params[i - count] for i in wanted]
            with hooks_silenced(box.params):
                found = torch.autograd.grad([o for o, _ in roots], wrt, [g for _, g in roots], allow_unused=True)
            for i, grad in zip(wanted, found):
                result[i] = grad
        return (None, *result)


def graft(outputs: Sequence[torch.Tensor], stand_ins: Sequence[torch.Tensor], attach: Sequence[torch.Tensor],
          params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``outputs`` (computed from ``stand_ins`` and ``params``) as functions of ``attach`` and ``params``.

    ``attach[i]`` is the real tensor ``stand_ins[i]`` stood for (same values). The sub-network's graph is
    differentiated once, when the returned tensors are backpropagated.
    """
    if len(stand_ins) != len(attach):
        raise RegionError(f"graft: {len(stand_ins)} stand-ins for {len(attach)} tensors")
    box = _Box(list(outputs), list(stand_ins), list(params))
    return cast("tuple[torch.Tensor, ...]", _Graft.apply(box, *attach, *params))  # type: ignore[no-untyped-call]
