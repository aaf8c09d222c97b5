"""Containers of invertible modules."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.modules.module import _global_forward_hooks

from ..errors import InvfxError
from ..utils import pack
from .module import Module, free

__all__ = ["InvertibleSequential"]


class InvertibleSequential(Module):
    """A chain of invertible modules; itself invertible (the inverse runs the blocks' inverses backwards).

    With ``checkpoint=False`` (the default for the container) each block is its own region, and the container
    frees every *link* of the chain, the output of block i that only block i+1 reads: it made that tensor and
    hands it to nobody else, so the proof that freeing is safe is the container's own. Only the last output is
    kept; memory is flat in depth. The container's input (the caller's tensor) is never freed.

    The proof holds while blocks keep no reference to their outputs: an output a forward hook sees is not freed
    (the hook may keep it), but a block whose ``function`` stores its output somewhere breaks it.

    With ``invertible=True`` the whole chain is one region (one inverse for the chain).

    With ``logdet=True`` (normalizing flows) every block that has a ``logdet`` flag (the catalogue's layers)
    computes its log|det J|; the chain returns ``(*outputs, sum of the blocks' logdets)`` and its inverse takes
    that trailing logdet and ignores it.
    """

    is_container = True

    def __init__(self, *modules: torch.nn.Module, logdet: bool = False):
        super().__init__()
        for index, module in enumerate(modules):
            self.add_module(str(index), module)
        self.checkpoint = False
        self.logdet = bool(logdet)
        if self.logdet:
            for module in modules:
                if hasattr(module, "logdet"):
                    module.logdet = True

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> torch.nn.Module:
        return list(self._modules.values())[index]

    def __iter__(self):
        return iter(self._modules.values())

    @property
    def reversible(self) -> bool:
        return all(getattr(m, "reversible", False) for m in self)

    def forward(self, *inputs):
        if self.checkpoint and torch.is_grad_enabled():
            return super().forward(*inputs)
        if self.logdet and self.reversed:
            raise InvfxError("InvertibleSequential: a reversed chain cannot return log-determinants")
        outputs, total = inputs, None
        blocks = list(self) if not self.reversed else list(reversed(list(self)))
        previous = None
        for block in blocks:
            # Links (outputs of the previous block) are ours to free; the caller's inputs are not, nor an output
            # a forward hook has seen (it may keep it).
            links = () if previous is None or _hooked(previous) else \
                tuple(t for t in outputs if isinstance(t, torch.Tensor))
            flip = block.temp_mode(reversed=not block.reversed) if self.reversed else contextlib.nullcontext()
            with free(*links), flip:
                outputs = pack(block(*outputs))
            del links
            outputs, total = self._take_logdet(block, outputs, total)
            previous = block
        return self._result(outputs, total)

    def function(self, *inputs, strict=None):
        outputs, total = inputs, None
        for block in self:
            outputs = pack(_call_function(block, outputs))
            outputs, total = self._take_logdet(block, outputs, total)
        return self._result(outputs, total)

    def inverse(self, *outputs, saved=()):
        inputs = outputs[:-1] if self.logdet else outputs
        for block in reversed(list(self)):
            with_logdet = self.logdet and getattr(block, "logdet", False)
            inputs = pack(_call_inverse(block, (*inputs, None) if with_logdet else inputs))
        return inputs[0] if len(inputs) == 1 else inputs

    def _take_logdet(self, block, outputs: tuple, total):
        if not (self.logdet and getattr(block, "logdet", False)):
            return outputs, total
        logdet = outputs[-1]
        return outputs[:-1], logdet if total is None else total + logdet

    def _result(self, outputs: tuple, total):
        if self.logdet:
            if total is None:
                first = next(t for t in outputs if isinstance(t, torch.Tensor))
                total = first.new_zeros(first.shape[0])
            return (*outputs, total)
        return outputs[0] if len(outputs) == 1 else outputs


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_hooks_always_called or _global_forward_hooks)


def _call_function(block, inputs):
    if isinstance(block, Module):
        return block.process_outputs(*pack(block.call_function(*inputs)))
    return block(*inputs)


def _call_inverse(block, outputs):
    if isinstance(block, Module):
        return block.call_inverse(*outputs, saved=())
    raise TypeError(f"{type(block).__name__} has no inverse")
