"""Containers of invertible modules."""

from __future__ import annotations

import contextlib

import torch

from torch.nn.modules.module import _global_forward_hooks

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
    """

    is_container = True

    def __init__(self, *modules: torch.nn.Module):
        super().__init__()
        for index, module in enumerate(modules):
            self.add_module(str(index), module)
        self.checkpoint = False

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
        outputs = inputs
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
            previous = block
        return outputs[0] if len(outputs) == 1 else outputs

    def function(self, *inputs, strict=None):
        outputs = inputs
        for block in self:
            outputs = pack(_call_function(block, outputs))
        return outputs[0] if len(outputs) == 1 else outputs

    def inverse(self, *outputs, saved=()):
        inputs = outputs
        for block in reversed(list(self)):
            inputs = pack(_call_inverse(block, inputs))
        return inputs[0] if len(inputs) == 1 else inputs


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
