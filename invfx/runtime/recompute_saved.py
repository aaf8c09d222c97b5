"""Activations saved as how to recompute them: a cheap op's output that a matrix product saves for backward is
rebuilt from that op's input when backward needs it, instead of being kept.

In a transformer block, ``fc2`` saves GELU's output (4 MiB of a block's 18 in the benchmark transformer) and
GELU saves its own input (``fc1``'s output); ``qkv`` and ``fc1`` save LayerNorm outputs, and each LayerNorm
saves its input (the residual stream). The outputs are computed from inputs autograd keeps anyway: keeping them
too costs memory, and rebuilding them costs one cheap op each, in backward.

:class:`RecomputedInput` stands for the consumer (an ``nn.Linear``) of ``value = producer(source)``. It runs the
consumer, then finds the tensors the consumer's autograd nodes saved that are ``value`` (or views of its
storage) and registers saved-tensor hooks on them (``grad_fn._raw_saved_*.register_hooks``): the pack runs at
once, lets go of the tensor and keeps ``source``; the unpack, when backward needs the tensor, runs
``producer.forward(source)`` under backward's grad mode (so a double backward has its history) and hands back
the same view. Nothing is freed by hand: ``value``'s memory goes when nothing else holds it, and where something
does (a later region keeps it, another op saves it), it simply stays.

Exactness: the producer's forward is deterministic (LayerNorm, GELU), runs on the same ``source`` with the same
parameters (an optimizer steps after backward), so the rebuilt tensor is the saved one, bit for bit. Not done,
and the value saved as it is: under autocast (backward would rebuild outside it), under torch.func transforms,
under the caller's saved-tensor hooks (torch's checkpoint, offloading, invfx's own measurements and dry runs),
nor where ``torch.distributed`` is initialized (FSDP2 swaps parameters for shards after the forward).
A rebuilt output laid out otherwise than the original is copied into the original's strides.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["RecomputedInput", "release_saved", "measuring"]

# Where a caller's saved-tensor hooks already hold what the consumer saved (invfx's cost model measuring what
# each segment keeps), told of each value the runtime would have released there, to leave it out of the count
_measuring: contextvars.ContextVar[Callable[[torch.Tensor], None] | None] = contextvars.ContextVar(
    "invfx_recompute_saved", default=None)


@contextlib.contextmanager
def measuring(released: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Meanwhile ``released(value)`` is called where a :class:`RecomputedInput` found its consumer's saved
    tensors already under saved-tensor hooks (the measurement's own), for each ``value`` it would have let go
    of otherwise."""
    token = _measuring.set(released)
    try:
        yield
    finally:
        _measuring.reset(token)


# the saved-tensor attributes of each autograd node type, found once per type
_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


class RecomputedInput(nn.Module):
    """``consumer(value)`` where ``value = producer(source)``, called as ``module(value, source)``: what the
    consumer saves of ``value`` for backward is rebuilt from ``source`` when backward needs it.

    ``consumer`` and ``producer`` are the model's own modules, children here (so that their parameters are
    found), but not in the ``state_dict``, which stays the model's. ``active`` (the plan's choice, True unless
    the budget leaves room for the saved copy): False runs ``consumer(value)`` as it is."""

    active = True  # (the class's default: also what one pickled before the flag existed reads)

    def __init__(self, consumer: nn.Module, producer: nn.Module, name: str) -> None:
        super().__init__()
        self.consumer = consumer
        self.producer = producer
        self.name = name  # (its name in the optimized module: whose keys are the model's, not missing)
        self.register_load_state_dict_post_hook(_not_missing)  # type: ignore[no-untyped-call]

    def forward(self, value: torch.Tensor, source: torch.Tensor) -> Any:
        out = self.consumer(value)
        if not self.active or not _may_release(value, source, out) or not _plain_parameters(self.producer):
            return out
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            # the caller's saved-tensor hooks have what the consumer saved (even reading it back would call
            # them): left as it is. Where they are the cost model's, it is told what the runtime lets go of.
            told = _measuring.get()
            if told is not None:
                told(value)
            return out
        release_saved(out, value, source, self.producer)
        return out

    def apply(self, fn: Any) -> RecomputedInput:
        # (its children are the model's own modules, which ``apply`` reaches under their own names: once each,
        # so a function that is not idempotent, re-initialising weights, runs on them once)
        fn(self)
        return self

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        # (the model's modules, saved under their own names; positional arguments are torch's old signature)
        if args:
            destination = args[0]
        return OrderedDict() if destination is None else destination


def _not_missing(module: nn.Module, incompatible: Any) -> None:
    """The consumer's and producer's keys under this module's name are not missing: they are loaded under the
    model's own names."""
    own = tuple(f".{module.name}.{child}." for child in ("consumer", "producer"))
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not any(o in "." + k for o in own)]


def _may_release(value: Any, source: Any, out: Any) -> bool:
    return (not torch._C._are_functorch_transforms_active()  # (first: a transform's wrapper has no storage)
            and type(value) is torch.Tensor and isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)
            and out.grad_fn is not None and value.untyped_storage().nbytes() > 0
            and not any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")))


def _plain_parameters(producer: nn.Module) -> bool:
    """Whether the producer's parameters will be, in backward, the tensors its forward read: not where
    ``torch.distributed`` runs (FSDP2 swaps a module's parameters for shards after its forward, which the
    rebuild would read), nor with parameters of a tensor subclass (a DTensor)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    return all(type(p) in (torch.Tensor, nn.Parameter) for p in producer.parameters())


def release_saved(out: torch.Tensor, value: torch.Tensor, source: torch.Tensor,
                  producer: nn.Module) -> tuple[int, int]:
    """Register, on each tensor the autograd nodes between ``out`` and ``value`` saved that shares
    ``value``'s storage, hooks that keep ``source`` instead and rebuild it with ``producer.forward``. Returns how
    many were registered, and how many refused (hooks already on them)."""
    pointer, base, dtype = value.untyped_storage().data_ptr(), int(value.storage_offset()), value.dtype
    shape, stride = value.shape, value.stride()
    stop = value.grad_fn
    registered = refused = 0
    seen: set[int] = set()
    pending = [out.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node is stop or id(node) in seen or type(node).__name__ == "AccumulateGrad":
            continue
        seen.add(id(node))
        for name in _saved_names(node):
            saved = getattr(node, name[4:], None)  # ("_raw_saved_x" -> "_saved_x": the tensor itself)
            if not (isinstance(saved, torch.Tensor) and saved.dtype == dtype
                    and saved.untyped_storage().data_ptr() == pointer):
                continue
            recipe = _Recipe(source, producer, shape, stride, saved.shape, saved.stride(),
                             int(saved.storage_offset()) - base)
            try:
                getattr(node, name).register_hooks(recipe.pack, recipe.unpack)
            except RuntimeError:  # (hooks already on it: the caller's saved-tensor hooks; saved as it is)
                refused += 1
                continue
            registered += 1
        pending.extend(f for f, _ in node.next_functions)
    return registered, refused


def _saved_names(node: Any) -> tuple[str, ...]:
    names = _SAVED_NAMES.get(type(node))
    if names is None:
        names = tuple(n for n in dir(node) if n.startswith("_raw_saved_"))
        _SAVED_NAMES[type(node)] = names
    return names


class _Recipe:
    """How to rebuild one saved view of ``producer(source)``."""

    __slots__ = ("source", "producer", "shape", "stride", "view")

    def __init__(self, source: torch.Tensor, producer: nn.Module, shape: torch.Size, stride: tuple[int, ...],
                 view_shape: torch.Size, view_stride: tuple[int, ...], view_offset: int) -> None:
        self.source, self.producer = source, producer
        self.shape, self.stride = shape, stride
        self.view = (view_shape, view_stride, view_offset)

    def pack(self, tensor: torch.Tensor) -> _Recipe:
        return self  # (the tensor itself is let go)

    @staticmethod
    def unpack(recipe: _Recipe) -> torch.Tensor:
        rebuilt: torch.Tensor = recipe.producer.forward(recipe.source)  # (not its hooks; backward's grad mode)
        if rebuilt.shape != recipe.shape or rebuilt.stride() != recipe.stride:
            laid = torch.empty_strided(recipe.shape, recipe.stride, dtype=rebuilt.dtype, device=rebuilt.device)
            rebuilt = laid.copy_(rebuilt)
        shape, stride, offset = recipe.view
        return rebuilt.as_strided(shape, stride, rebuilt.storage_offset() + offset)
