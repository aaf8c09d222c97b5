"""What a selective checkpoint keeps: the outputs of chosen ops, from its forward for its recomputation.

A checkpoint region keeps only its inputs and reruns its whole forward in backward. Most of that forward's time
goes to a few expensive ops (convolutions, matrix products, attention), most of its activations to many cheap
ones (normalisation, activations, adds). An :class:`OutputStash` keeps the outputs of the expensive ops as the
forward makes them; the recomputation then takes each from the stash instead of running the op again, and runs
the cheap ops only. This is torch's selective activation checkpointing
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``), written for invfx's runtime, whose
recomputation builds a graph of its own (a cached output gets its op's autograd node, which needs the op's
inputs, not its output), and checked more strictly: an entry is taken only by a call of the same op on
arguments of the same shapes, strides and dtypes (and the same parameters), in the same order, and only if
nothing wrote into it since it was kept; any other call runs the op, as a plain checkpoint would.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from ..graphs import leaves

__all__ = ["OutputStash", "EXPENSIVE_OPS", "stash_begin", "stash_end"]

#: the ops a selective checkpoint keeps by default: where a forward's FLOPs are
EXPENSIVE_OPS: frozenset[Any] = frozenset({
    torch.ops.aten.convolution, torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
    torch.ops.aten.baddbmm, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
    torch.ops.aten._scaled_dot_product_efficient_attention, torch.ops.aten._scaled_dot_product_flash_attention,
    torch.ops.aten._scaled_dot_product_cudnn_attention,
})

_Signature = tuple[Any, ...]


# The stash mode of the region running now, for stash_begin / stash_end: a region whose function marks the calls
# whose outputs it keeps (Region(keep_marked=True)) records and replays only there, so the Python dispatch mode
# costs nothing in the cheap ops between (around the whole function it cost a ResNet block about as much as
# recomputing its BatchNorms and ReLUs).
_active: contextvars.ContextVar[TorchDispatchMode | None] = contextvars.ContextVar("invfx_stash", default=None)


def stash_begin() -> TorchDispatchMode | None:
    """Start keeping (in forward) or handing back (in the recomputation) the outputs of the next call; returns
    what :func:`stash_end` closes. Outside a selective region, nothing."""
    mode = _active.get()
    if mode is not None:
        mode.__enter__()  # type: ignore[no-untyped-call]
    return mode


def stash_end(mode: TorchDispatchMode | None) -> None:
    if mode is not None:
        mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]


class OutputStash:
    """The outputs of ``ops`` (op overload packets, ``torch.ops.aten.convolution``) made under
    :meth:`recording`, handed back under :meth:`replaying` to the same calls in the same order. ``constants``:
    the storage pointers of tensors (parameters, buffers) whose identity is part of a call's signature."""

    def __init__(self, ops: Iterable[Any], constants: frozenset[int] = frozenset(), name: str = "region") -> None:
        self.ops = frozenset(ops)
        self.name = name
        self._constants = constants
        self._entries: defaultdict[Any, deque[tuple[_Signature, Any, list[int]]]] = defaultdict(deque)

    def recording(self) -> TorchDispatchMode:
        return _Recording(self)

    def replaying(self) -> TorchDispatchMode:
        return _Replaying(self)

    @staticmethod
    @contextlib.contextmanager
    def marked(mode: TorchDispatchMode) -> Iterator[None]:
        """Meanwhile ``mode`` (:meth:`recording` or :meth:`replaying`) is on only between :func:`stash_begin`
        and :func:`stash_end`."""
        token = _active.set(mode)
        try:
            yield
        finally:
            _active.reset(token)

    @property
    def mutated(self) -> int:
        """How many kept outputs were written in place since they were kept (they will not be used)."""
        return sum(1 for entries in self._entries.values() for _, kept, versions in entries
                   if [t._version for t in _tensors(kept)] != versions)

    @property
    def nbytes(self) -> int:
        """The bytes the stash holds now (each storage once)."""
        storages = {}
        for entries in self._entries.values():
            for _, value, _ in entries:
                for tensor in _tensors(value):
                    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return sum(storages.values())

    def clear(self) -> None:
        self._entries.clear()

    def drop(self, tensors: Iterable[torch.Tensor]) -> None:
        """Forget every kept output that shares memory with ``tensors`` (a region's outputs: the next region may
        free them, so the recomputation must not read them from here; it runs those ops again instead)."""
        shared = {t.untyped_storage().data_ptr() for t in tensors if t.untyped_storage().nbytes()}
        for func, entries in self._entries.items():
            self._entries[func] = deque(entry for entry in entries if not any(
                t.untyped_storage().data_ptr() in shared for t in _tensors(entry[1])))

    def _signature(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Signature:
        parts: list[Any] = [func]
        constants = self._constants
        for leaf in leaves((args, kwargs), _is_argument):
            if isinstance(leaf, torch.Tensor):
                pointer = None
                if constants and leaf.untyped_storage().nbytes():
                    pointer = leaf.untyped_storage().data_ptr()
                parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device,
                              pointer if pointer in constants else None))
            else:
                parts.append(leaf if isinstance(leaf, (int, float, bool, str, type(None), torch.dtype)) else
                             type(leaf))
        return tuple(parts)

    def _keeps(self, func: Any) -> bool:
        return getattr(func, "overloadpacket", None) in self.ops or func in self.ops


def _tensors(value: Any) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else leaves(value, _is_tensor)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _is_argument(value: Any) -> bool:
    """An op's argument, as a signature reads it: anything but a tuple, list or dict of them."""
    return not isinstance(value, (tuple, list, dict))


def _detached(value: Any) -> Any:
    """``value`` (an op's output: a tensor, or a tuple or list of them and other things) with each tensor
    detached: fresh aliases, so what the replay hands out never shares autograd metadata with the kept one."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if type(value) in (tuple, list):
        return type(value)(_detached(item) for item in value)
    return tree_map_only(torch.Tensor, torch.Tensor.detach, value)  # (a named tuple, anything else)


class _StashMode(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self, stash: OutputStash) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.stash = stash


class _Recording(_StashMode):  # type: ignore[no-untyped-call]
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.stash._keeps(func):
            # (the output itself: an alias made down here would not share its version counter, and a write
            # into the output would go unseen; a fresh alias is handed back when replayed)
            versions = [t._version for t in _tensors(out)]
            self.stash._entries[func].append((self.stash._signature(func, args, kwargs), out, versions))
        return out


class _Replaying(_StashMode):  # type: ignore[no-untyped-call]
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        entries = self.stash._entries.get(func) if self.stash._keeps(func) else None
        if entries and entries[0][0] == self.stash._signature(func, args, kwargs):
            _, kept, versions = entries.popleft()
            if [t._version for t in _tensors(kept)] == versions:
                return _detached(kept)
            # written in place after it was kept (an in-place op the graph did not show, inside a leaf module):
            # not the op's output any more, so the op runs again, as in a plain checkpoint
        return func(*args, **kwargs)
