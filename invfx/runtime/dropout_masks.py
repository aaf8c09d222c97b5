"""Dropout masks kept by a checkpoint, so that its recomputation multiplies instead of drawing again.

A checkpoint region recomputes its forward in backward; a dropout in it must drop the same elements as in the
forward. Restoring the RNG state and drawing again does that (torch's checkpoint, and invfx's regions without
this record), but on a CPU drawing is most of a dropout's time: ``bernoulli_`` over a 16x128x128 float32
activation took 1.81 ms of the dropout's 1.91 (2-core VM, fastest of 30), where replaying a kept mask takes 0.28
ms (fastest of 30, with the 8-kernel bit packing of :func:`~invfx.runtime.branches.pack_bits`) and recording it
costs what the dropout does (2.23 ms against 2.35, within the noise). A :class:`DropoutMasks` keeps each
dropout's mask from the forward, packed 1 bit per element (1/32 of a float32 activation), and the recomputation
rebuilds the dropout's scaled noise from it and multiplies, as the forward did.

Exactness. On a CPU, ``F.dropout(x, p, training=True)`` is ``noise = empty_like(x).bernoulli_(1 - p);
noise.div_(1 - p); x * noise`` (ATen's ``_dropout``; the fused ``native_dropout`` is taken on accelerators
only). The record runs exactly those ops, so the forward draws the same numbers from the same generator as
plain autograd and computes the same values; the replay rebuilds ``noise`` from the bits (0 and 1 are exact in
every floating dtype) and divides it by the same ``1 - p``, so the recomputed output is bit-identical to the
forward's, and its backward (``grad * noise``, the same ``mul``) is plain autograd's. Dropout on other devices, or
with ``p`` outside (0, 1), or not in training, is not recorded: it runs as it is (a region then replays it by
restoring the RNG state, as before).

The generator. The replay draws nothing where the forward drew, so a random op after a recorded dropout would
see another state than in the forward. Where some random number was drawn between a recorded dropout and the
next one (or the end of the region's forward), the record keeps the CPU generator's state right after the
dropout (5 KB), and the replay sets it there; where none was (every random op of the region is a recorded
dropout, the common case), no state is kept.

Where the calls are. A region's body whose every dropout is a call it shows (``F.dropout``, ``aten.dropout``,
an ``nn.Dropout``) calls :func:`dropout` / :func:`module_dropout` instead (``Region(dropouts_marked=True)``),
which record or replay themselves. Elsewhere (a body running code the tracer did not enter, which may call
``F.dropout`` itself) a torch-function mode catches the calls; it costs a Python round trip for every torch call
in the region (0.3 ms of a 10.5 ms transformer block's forward), in the forward and again in the recomputation.

Ops are matched at the torch-function level (``F.dropout``, which ``nn.Dropout`` calls, and ``aten.dropout``,
which graphs from ``torch.export`` call; ``aten.dropout`` runs ATen's same CPU dropout), in call order: a
region's recomputation runs the same function as its forward, so the same dropouts in the same order. A replay
that meets a dropout of another shape, dtype or ``p`` than was recorded at that place raises
:class:`~invfx.RegionError`; one that meets more dropouts than were recorded runs them as they are (drawing from
the generator, which the replay restored).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import RegionError
from .branches import pack_bits, unpack_bits

__all__ = ["DropoutMasks", "DROPOUT_FUNCTIONS", "recording", "replaying", "records", "dropout", "module_dropout",
           "LeanDropout"]


@dataclass
class _Mask:
    shape: torch.Size
    dtype: torch.dtype
    p: float
    bits: torch.Tensor  # uint8, 8 elements to a byte
    after: torch.Tensor | None  # the CPU generator's state right after the draw, where a later draw needs it


class DropoutMasks:
    """The masks of one region call's recorded dropouts, in call order. ``nbytes``: what it holds."""

    __slots__ = ("name", "masks", "nbytes")

    def __init__(self, name: str = "region") -> None:
        self.name = name
        self.masks: list[_Mask] = []
        self.nbytes = 0

    def __bool__(self) -> bool:
        return bool(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def add(self, x: torch.Tensor, p: float, noise: torch.Tensor) -> None:
        """Keep the mask of a dropout of ``x`` that drew ``noise``, and the generator's state after it."""
        bits, after = pack_bits(noise != 0), torch.get_rng_state()
        self.masks.append(_Mask(x.shape, x.dtype, p, bits, after))
        self.nbytes += bits.numel() + after.numel()

    def settle(self) -> None:
        """Drop the last mask's generator state if nothing drew since (call at the next draw and at the end of
        the forward): the replay then needs it only where another random op follows."""
        after = self.masks[-1].after if self.masks else None
        if after is not None and torch.equal(after, torch.get_rng_state()):
            self.nbytes -= after.numel()
            self.masks[-1].after = None

    def clear(self) -> None:
        self.masks.clear()
        self.nbytes = 0


def records(x: Any, p: Any, training: Any) -> bool:
    """Whether ``F.dropout(x, p, training)`` is one a record keeps the mask of (else it runs as it is)."""
    return (training is True and isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p < 1
            and type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type == "cpu" and not x.is_nested
            and x.is_floating_point() and x.numel() > 0)


class _Active:
    __slots__ = ("phase", "masks", "index")

    def __init__(self, phase: str, masks: DropoutMasks) -> None:
        self.phase, self.masks, self.index = phase, masks, 0


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("invfx_dropout_masks", default=None)


# the calls recorded: F.dropout (nn.Dropout's), and aten.dropout, which graphs exported by torch.export call
DROPOUT_FUNCTIONS = (F.dropout, torch.ops.aten.dropout.default)


def _arguments(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(input, p, training, inplace) of a call of one of ``DROPOUT_FUNCTIONS``."""
    def get(position: int, name: str, default: Any) -> Any:
        return args[position] if len(args) > position else kwargs.get(name, default)
    if func is F.dropout:
        return get(0, "input", None), get(1, "p", 0.5), get(2, "training", True), get(3, "inplace", False)
    return get(0, "input", None), get(1, "p", None), get(2, "train", None), False


def _masked(active: _Active, x: torch.Tensor, p: float, inplace: bool, lean: bool, unrecorded: Any) -> Any:
    """A dropout that ``active`` records or replays (:func:`records` said so); ``unrecorded()`` runs it as it
    is, for a replay that meets more dropouts than were recorded. ``lean``: where the record runs with grad (the
    cost model measuring what a segment keeps), autograd saves the 1-byte mask, as that dropout does outside a
    record (:class:`LeanDropout`)."""
    masks = active.masks
    if active.phase == "record":
        masks.settle()
        # ATen's CPU dropout, op for op: the same draws and the same values as F.dropout
        noise = _noise_like(x, p)
        if inplace:
            out = x.mul_(noise)
        elif lean and _autograd_would_save(x):
            out = _MaskSaved.apply(x, noise, p)  # type: ignore[no-untyped-call]
        else:
            out = x.mul(noise)
        masks.add(x, p, noise)
        return out
    if active.index >= len(masks.masks):
        return unrecorded()  # not recorded: drawn from the generator, as it is
    mask = masks.masks[active.index]
    if (mask.shape, mask.dtype, mask.p) != (x.shape, x.dtype, p):
        raise RegionError(
            f"{masks.name}: the recomputation ran dropout(p={p}) on {tuple(x.shape)} {x.dtype} where the "
            f"forward ran dropout(p={mask.p}) on {tuple(mask.shape)} {mask.dtype} (dropout "
            f"{active.index}); a region must run the same ops when recomputed")
    active.index += 1
    noise = _noise_from(unpack_bits(mask.bits, mask.shape), torch.empty_like(x), p)
    out = x.mul_(noise) if inplace else x.mul(noise)
    if mask.after is not None:
        torch.set_rng_state(mask.after)
    return out


def _autograd_would_save(x: torch.Tensor) -> bool:
    """Whether autograd would save a dropout's noise for ``x``'s backward, where :class:`_MaskSaved` saves the
    mask instead (not under torch.func's transforms, which need more of an autograd.Function than it has)."""
    return x.requires_grad and torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()


def _noise_like(x: torch.Tensor, p: float) -> torch.Tensor:
    """The scaled noise of ATen's CPU dropout (``_dropout``): the same draws from the same generator."""
    noise = torch.empty_like(x).bernoulli_(1 - p)
    return noise.div_(1 - p)


def _noise_from(kept: torch.Tensor, noise: torch.Tensor, p: float) -> torch.Tensor:
    """``noise`` (empty, laid out as the forward's) filled with the noise whose nonzero elements ``kept`` says
    (bool): 0 and 1, then divided by ``1 - p`` as the forward divided, so bit for bit the forward's."""
    noise.copy_(kept.view(torch.uint8))  # (0 or 1: from uint8, 3x faster than from bool)
    return noise.div_(1 - p)


class _MaskSaved(torch.autograd.Function):
    """``x * noise`` (a CPU dropout's product), saving for backward the mask (1 byte an element) where autograd
    saves ``noise`` itself (the element's size: 4 bytes in float32). The backward rebuilds the same ``noise``
    from the mask and multiplies as autograd's ``MulBackward0`` does (0 and 1 are exact in every floating dtype,
    and the division is the forward's), so the gradient is plain autograd's, bit for bit."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, noise: torch.Tensor, p: float) -> torch.Tensor:
        ctx.p, ctx.dtype = p, noise.dtype
        ctx.save_for_backward(noise != 0)
        return x.mul(noise)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (kept,) = ctx.saved_tensors
        # (the mask's layout is the forward noise's)
        return grad.mul(_noise_from(kept, torch.empty_like(kept, dtype=ctx.dtype), ctx.p)), None, None


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            lean: bool = False) -> torch.Tensor:
    """``F.dropout``: the same draws and values. Run by a region that records masks, its mask is recorded or
    replayed by that region (called directly: no torch-function mode needed). Elsewhere ``F.dropout``, or with
    ``lean`` (:class:`LeanDropout`), where autograd would save the float noise for backward (a CPU dropout in
    training, not in place, on a tensor that needs grad), a 1-byte mask instead (:class:`_MaskSaved`)."""
    if not records(input, p, training):
        return F.dropout(input, p, training, inplace)
    active = _ACTIVE.get()
    if active is None:
        return _unrecorded(input, p, inplace, lean)
    masked: torch.Tensor = _masked(active, input, p, inplace, lean, lambda: _unrecorded(input, p, inplace, lean))
    return masked


def _unrecorded(x: torch.Tensor, p: float, inplace: bool, lean: bool) -> torch.Tensor:
    """A training CPU dropout no record sees: ``F.dropout``, or with ``lean`` its mask saved in a byte."""
    if lean and not inplace and _autograd_would_save(x):
        out: torch.Tensor = _MaskSaved.apply(x, _noise_like(x, p), p)  # type: ignore[no-untyped-call]
        return out
    return F.dropout(x, p, True, inplace)


def module_dropout(module: torch.nn.Dropout, input: torch.Tensor, lean: bool = False) -> torch.Tensor:
    """``module(input)`` for an ``nn.Dropout``, as :func:`dropout` (its ``p``, ``training`` and ``inplace`` read
    at the call, so ``.eval()`` acts as on the module)."""
    return dropout(input, module.p, module.training, module.inplace, lean=lean)


class LeanDropout(torch.nn.Module):
    """An ``nn.Dropout`` as ``invfx.optimize`` runs it: :func:`dropout`, whose backward keeps a 1-byte mask
    instead of the float noise (a quarter of the bytes in float32), and whose mask a checkpoint records. The
    ``nn.Dropout`` it stands for is its child ``dropout`` and decides ``p``, ``inplace`` and train or eval at
    each call, as before (``model.eval()`` reaches it)."""

    def __init__(self, dropout: torch.nn.Dropout) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return module_dropout(self.dropout, input, lean=True)

    def apply(self, fn: Any) -> LeanDropout:
        # (its child is the model's own nn.Dropout, which ``apply`` reaches under its own name: once)
        fn(self)
        return self


class _DropoutMode(TorchFunctionMode):
    def __init__(self, active: _Active) -> None:
        super().__init__()
        self.active = active

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        # (a region nested inside this one's function records its own dropouts, or none)
        if func not in DROPOUT_FUNCTIONS or _ACTIVE.get() is not self.active:
            return func(*args, **kwargs)
        x, p, training, inplace = _arguments(func, args, kwargs)
        if not records(x, p, training):
            return func(*args, **kwargs)
        return _masked(self.active, x, p, inplace, False, lambda: func(*args, **kwargs))


@contextlib.contextmanager
def _active(phase: str, masks: DropoutMasks | None, direct: bool) -> Iterator[None]:
    if masks is None:
        # (a region that records none hides an enclosing region's record from the dropouts it runs)
        token = _ACTIVE.set(None)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
        return
    active = _Active(phase, masks)
    token = _ACTIVE.set(active)
    try:
        with contextlib.nullcontext() if direct else _DropoutMode(active):
            yield
    finally:
        _ACTIVE.reset(token)
    if phase == "record":
        masks.settle()


def recording(masks: DropoutMasks | None, direct: bool = False) -> contextlib.AbstractContextManager[None]:
    """Within the block, CPU dropouts in training add their masks to ``masks``: every ``F.dropout`` /
    ``aten.dropout`` call, or with ``direct`` only the calls of :func:`dropout` and :func:`module_dropout`. None:
    nothing is recorded (an enclosing region's record included)."""
    return _active("record", masks, direct)


def replaying(masks: DropoutMasks | None, direct: bool = False) -> contextlib.AbstractContextManager[None]:
    """Within the block, the dropouts take their masks from ``masks``, in order (``direct``: as for
    :func:`recording`)."""
    return _active("replay", masks, direct)
