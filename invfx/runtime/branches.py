"""Branch records: what a rebuilt sub-network's backward branches on, kept from the forward.

An invertible region recomputes its sub-networks in backward on *rebuilt* inputs, equal to the forward's up to
the inverse's rounding. Where an op's backward branches on the sign or a threshold of its input (relu's mask,
leaky relu's slope, hardtanh's and clamp's range, abs's sign, max pooling's argmax), a value that rounding moves
across the threshold takes the other branch, and the gradient is not plain autograd's: on a float32 Glow-style
flow 32 steps deep, up to 7.6e-3 relative.

A :class:`BranchRecord` is filled while a region's forward runs (:func:`recording`) with what each such op
branched on, packed: a mask in 1 bit per element (2 for hardtanh, clamp and abs), a max pool's argmax as its
offset in the pooling window (1 byte per output element). A relu's or leaky relu's mask is kept *sparse* where
that is smaller: only the elements near its threshold (``|x| <= near * max|x|``, ``near`` = 100 times the
dtype's chain tolerance: 1e-3 in float32), with their branch; the others keep the sign of the rebuilt input,
which rounding cannot flip while the rebuild is within that margin (the plan checks rebuilds along chains to
1e-5 in float32). A replay that finds an element outside the recorded ones within half that margin of the
threshold warns: the rebuild drifted further than the margin allows for, and a branch may differ. At depth, a
dense mask costs 1 bit per element of every sub-network's activation; a sparse one a few percent of that.

While the backward rebuilds and recomputes the region (:func:`replaying`) each such op is replaced by a
differentiable formula that takes the recorded branch (``relu(x)`` by ``where(mask, x, 0)``, a max pool by a gather
at the recorded argmax): its gradient is plain autograd's on the forward's values (the same branches), its value
the original's up to the rounding of ``x``.

Ops are matched at the torch-function level (``F.relu``, ``torch.relu``, ``Tensor.relu`` and ``nn.ReLU``, which
calls ``F.relu``; and the like), and recorded per *scope*: the sub-network mark called last
(:func:`invfx.runtime.rng_mark`), in call order. A rebuild may run sub-networks in another order than the
forward (``y1 = x1 + F(x2); y2 = x2 + G(y1)`` is undone G first), but each sub-network's own ops run in the
same order in both. Outside any mark nothing is recorded or replayed; :func:`unscoped` leaves the scope for a
while (a registry inverse called in a rebuild is not part of the sub-network marked before it). A replay that
meets a different op or shape than was recorded at that place raises :class:`~invfx.RegionError` instead of
replaying a wrong mask; one that meets more ops than were recorded runs them as they are.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import RegionError
from ..tolerances import TOLERANCES

__all__ = ["BranchRecord", "recording", "replaying", "branch_scope", "close_scope", "unscoped", "BRANCH_FUNCTIONS",
           "BRANCH_METHODS", "pack_bits", "unpack_bits"]

_LITTLE_ENDIAN = sys.byteorder == "little"


# ----------------------------------------------------------------------------------------------------------
# Masks packed 8 to a byte


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8, 8 elements to a byte (little-endian within the byte)."""
    flat = mask.reshape(-1).bool()
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if not _LITTLE_ENDIAN:
        bits = flat.view(-1, 8).to(torch.uint8)
        packed = bits[:, 0].clone()
        for k in range(1, 8):
            packed |= bits[:, k] << k
        return packed
    # Eight elements are the eight bytes (0 or 1) of one int64: element k is bit 8k. Or-ing the word with itself
    # shifted right by 7k for k = 0..7 brings bit 8k to bit k, and nothing else into the low byte (three
    # doubling steps: 7, 14, 28). Eight kernels on an eighth of the elements, against sixteen for a shift and an
    # or per bit: on a CPU, 0.05 ms for a million elements instead of 0.31.
    words = flat.view(torch.uint8).view(torch.int64)
    packed = words >> 7
    packed |= words
    packed |= packed >> 14
    packed |= packed >> 28
    packed &= 0xFF
    return packed.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_bits` packed."""
    if not _LITTLE_ENDIAN:
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = (packed.unsqueeze(1) >> shifts) & 1
        return bits.view(-1)[:math.prod(shape)].view(shape).bool()
    # The inverse spread: copies of the byte shifted left by 7k put bit k at bit 8k, the low bit of byte k
    # (never past bit 56: no sign, no overflow); the mask keeps those, and the bytes are then the booleans.
    words = packed.to(torch.int64)
    words |= words << 28
    words |= words << 14
    words |= words << 7
    words &= 0x0101010101010101
    return words.view(torch.uint8).view(torch.bool)[:math.prod(shape)].view(shape)


# ----------------------------------------------------------------------------------------------------------
# The record


class BranchRecord:
    """What the branching ops of one region call took, by scope, in call order. ``nbytes``: what it holds."""

    __slots__ = ("scopes", "nbytes", "name")

    def __init__(self, name: str = "region") -> None:
        self.scopes: dict[str, list[tuple[str, torch.Size, tuple[torch.Tensor, ...]]]] = {}
        self.nbytes = 0
        self.name = name

    def __bool__(self) -> bool:
        return any(self.scopes.values())

    def add(self, scope: str, kind: str, shape: torch.Size, *packed: torch.Tensor) -> None:
        self.scopes[scope].append((kind, shape, packed))
        self.nbytes += sum(p.numel() * p.element_size() for p in packed)

    def summary(self) -> dict[str, int]:
        """Entries by kind (``{"relu": 3, "max_pool2d": 1}``)."""
        counts: dict[str, int] = {}
        for entries in self.scopes.values():
            for kind, _, _ in entries:
                counts[kind] = counts.get(kind, 0) + 1
        return counts


class _Active:
    """The record being filled or read, and where in it the op now running is. Its torch-function mode is on
    the stack only while a scope is open (``depth``: the stack's length with it on top; None: not pushed): every
    torch call under a mode pays a Python round trip, and a region's other ops need none."""

    __slots__ = ("phase", "record", "scope", "index", "mode", "depth")

    def __init__(self, phase: str, record: BranchRecord) -> None:
        self.phase, self.record = phase, record
        self.scope: str | None = None
        self.index = 0
        self.mode = _BranchMode(self)
        self.depth: int | None = None

    def push(self) -> None:
        if self.depth is None:
            self.mode.__enter__()  # type: ignore[no-untyped-call]
            self.depth = torch._C._len_torch_function_stack()

    def pop(self) -> None:
        """Take the mode off the stack if it is on top. (A mode that code in the sub-network pushed above it and
        has not popped yet keeps it there, passing every call through, until that code pops its own.)"""
        if self.depth is not None and torch._C._len_torch_function_stack() == self.depth:
            self.mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            self.depth = None


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("invfx_branches", default=None)


def branch_scope(name: str) -> None:
    """The ops that follow belong to sub-network ``name`` (called by :func:`invfx.runtime.rng_mark`)."""
    active = _ACTIVE.get()
    if active is None:
        return
    active.scope, active.index = name, 0
    active.push()
    if active.phase == "record":
        if name in active.record.scopes:
            raise RegionError(f"{active.record.name}: sub-network mark {name!r} used twice in one forward; "
                              "names must be unique within a region")
        active.record.scopes[name] = []


def close_scope() -> None:
    """The ops that follow belong to no sub-network (until the next mark): nothing is recorded or replayed."""
    active = _ACTIVE.get()
    if active is not None:
        active.scope = None
        active.pop()


@contextlib.contextmanager
def unscoped() -> Iterator[None]:
    """Within the block, ops belong to no sub-network: nothing is recorded or replayed."""
    active = _ACTIVE.get()
    if active is None:
        yield
        return
    scope, index = active.scope, active.index
    active.scope = None
    try:
        yield
    finally:
        active.scope, active.index = scope, index


class _BranchMode(TorchFunctionMode):
    def __init__(self, active: _Active) -> None:
        super().__init__()
        self.active = active

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        active = self.active
        handler = _HANDLERS.get(func)
        # (another region's record, nested inside this one's function, is that region's business)
        if handler is None or active.scope is None or _ACTIVE.get() is not active:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return func(*args, **kwargs)
        kind, record, replay = handler
        entries = active.record.scopes.get(active.scope)
        if active.phase == "record":
            result, packed = record(func, x, args, kwargs)
            if packed is not None:
                active.record.add(active.scope, kind, x.shape, *packed)
            return result
        if entries is None or active.index >= len(entries):
            return func(*args, **kwargs)  # not recorded here: run as it is
        recorded_kind, shape, packed = entries[active.index]
        if recorded_kind != kind or shape != x.shape:
            raise RegionError(
                f"{active.record.name}: in sub-network {active.scope!r} the rebuild ran {kind} on "
                f"{tuple(x.shape)} where the forward ran {recorded_kind} on {tuple(shape)} (call "
                f"{active.index}); a sub-network must run the same ops in its rebuild as in its forward")
        active.index += 1
        return replay(func, x, args, kwargs, packed)


@contextlib.contextmanager
def _active(phase: str, record: BranchRecord | None) -> Iterator[None]:
    if record is None:
        yield
        return
    active = _Active(phase, record)
    token = _ACTIVE.set(active)
    try:
        yield
    finally:
        active.scope = None
        active.pop()
        _ACTIVE.reset(token)


def recording(record: BranchRecord | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, branching ops in marked sub-networks add what they branch on to ``record``."""
    return _active("record", record)


def replaying(record: BranchRecord | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, branching ops in marked sub-networks take the branches ``record`` holds."""
    return _active("replay", record)


# ----------------------------------------------------------------------------------------------------------
# The ops: for each, how to record its branches and how to replay it with them, side by side

_Args = tuple[Any, ...]
_Kwargs = dict[str, Any]
_Packed = tuple[torch.Tensor, ...]
_Recorded = tuple[Any, "_Packed | None"]  # the op's result, and what it branched on (None: nothing to record)


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _in_place(result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.copy_(result)


# x > 0, kept dense or sparse (relu and leaky relu branch on it)
def _near_margin(dtype: torch.dtype) -> float | None:
    tolerance = TOLERANCES.get(dtype)
    return None if tolerance is None else 100 * tolerance.chain


def _record_positive(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x > 0``: (bits,) dense, or (indices, bits, margin) of the elements near 0 where that is smaller.
    (Each pass over ``x`` costs about as much as the relu itself: the sparse record takes four.)"""
    x = x.detach()
    margin = _near_margin(x.dtype)
    if margin is not None and x.numel() >= 64:
        low, high = torch.aminmax(x)
        scale = max(-float(low), float(high))
        if math.isfinite(scale):
            limit = margin * scale
            near = x >= -limit
            near &= x <= limit  # (in place: one mask less alive at once)
            indices = near.reshape(-1).nonzero().view(-1)  # (logical order: x may be a strided view)
            count = indices.numel()
            if 4 * count + count // 8 + 1 < x.numel() // 8:  # (int32 indices and their bits, against 1 bit each)
                positive = x.reshape(-1)[indices] > 0
                return indices.to(torch.int32), pack_bits(positive), torch.tensor(limit, dtype=torch.float64)
    return (pack_bits(x > 0),)


def _replay_positive(x: torch.Tensor, packed: tuple[torch.Tensor, ...], where: str) -> torch.Tensor:
    if len(packed) == 1:
        return unpack_bits(packed[0], x.shape)
    indices, bits, limit = packed
    with torch.no_grad():
        x = x.detach()
        positive = (x > 0).contiguous()  # (indexed in logical order, as recorded)
        half = float(limit) / 2
        # an element within half the margin of 0 that was not recorded: the rebuild drifted further than the
        # margin allows for (counted, not marked: the recorded ones are few)
        close = x > -half
        close &= x < half
        if int(close.sum()) > int(close.reshape(-1)[indices.long()].sum()) if indices.numel() else bool(close.any()):
            warnings.warn(f"{where}: a rebuilt input moved by more than {half:.3g} near a branch that was not "
                          "recorded (the margin is 100x the rebuild tolerance); its gradient may differ from "
                          "plain autograd's by that rounding", RuntimeWarning, stacklevel=2)
        if indices.numel():
            positive.view(-1)[indices.long()] = unpack_bits(bits, torch.Size([indices.numel()]))
    return positive


# relu: backward passes the gradient where the output is > 0 (where the input is)
_RELU_IN_PLACE = {torch.relu_, torch.Tensor.relu_, F.relu_}


def _relu_in_place(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return func in _RELU_IN_PLACE or (func is F.relu and bool(_argument(args, kwargs, 1, "inplace", False)))


def _record_relu(func: Any, x: torch.Tensor, args: _Args, kwargs: _Kwargs) -> _Recorded:
    packed = _record_positive(x)  # (before the call: in place, it overwrites x)
    return func(*args, **kwargs), packed


def _replay_relu(func: Any, x: torch.Tensor, args: _Args, kwargs: _Kwargs, packed: _Packed) -> Any:
    result = torch.where(_replay_positive(x, packed, "relu"), x, 0.0)
    return _in_place(result, x) if _relu_in_place(func, args, kwargs) else result


# leaky relu: slope 1 where the input is > 0, negative_slope elsewhere
def _leaky_slope(args: _Args, kwargs: _Kwargs) -> float:
    return float(_argument(args, kwargs, 1, "negative_slope", 0.01))


def _record_leaky_relu(func: Any, x: torch.Tensor, args: _Args, kwargs: _Kwargs) -> _Recorded:
    packed = _record_positive(x)  # (before the call: in place, it overwrites x)
    return func(*args, **kwargs), packed


def _replay_leaky_relu(func: Any, x: torch.Tensor, args: _Args, kwargs: _Kwargs, packed: _Packed) -> Any:
    result = torch.where(_replay_positive(x, packed, "leaky_relu"), x, x * _leaky_slope(args, kwargs))
    return _in_place(result, x) if bool(_argument(args, kwargs, 2, "inplace", False)) else result


# hardtanh / relu6 / clamp: the gradient passes inside the range; outside, the value is a bound
def _range_of(func: Any, args: _Args, kwargs: _Kwargs) -> tuple[float | None, float | None, bool, bool] | None:
    """(low, high, inclusive, in place), or None where the bounds are not numbers (tensor bounds get gradients
    of their own: not replayed)."""
    if func is F.hardtanh:
        low, high = _argument(args, kwargs, 1, "min_val", -1.0), _argument(args, kwargs, 2, "max_val", 1.0)
        inclusive, in_place = False, bool(_argument(args, kwargs, 3, "inplace", False))
    elif func is F.relu6:
        low, high, inclusive, in_place = 0.0, 6.0, False, bool(_argument(args, kwargs, 1, "inplace", False))
    elif func in (torch.clamp_min, torch.Tensor.clamp_min):
        low, high, inclusive, in_place = _argument(args, kwargs, 1, "min", None), None, True, False
    elif func in (torch.clamp_max, torch.Tensor.clamp_max):
        low, high, inclusive, in_place = None, _argument(args, kwargs, 1, "max", None), True, False
    else:  # clamp, clip
        low, high = _argument(args, kwargs, 1, "min", None), _argument(args, kwargs, 2, "max", None)
        inclusive, in_place = True, False
    if not all(b is None or isinstance(b, (int, float)) for b in (low, high)) or (low is None and high is None):
        return None
    return (None if low is None else float(low), None if high is None else float(high), inclusive, in_place)


def _record_range(func: Any, x: torch.Tensor, args: _Args, kwargs: _Kwargs) -> _Recorded:
    bounds = _range_of(func, args, kwargs)
    if bounds is None:
        return func(*args, **kwargs), None
    low, high, inclusive, _ = bounds
    inside = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        inside &= (x >= low) if inclusive else (x > low)
    if high is not None:
        inside &= (x <= high) if inclusive else (x < high)
    # (outside and at or above the top bound: the value is the top bound; at it, hardtanh's is too)
    above = x >= high if high is not None else torch.zeros_like(x, dtype=torch.bool)
    packed = (pack_bits(inside), pack_bits(above))
    return func(*args, **kwargs), packed


def _replay_range(func: Any, x: torch.Tensor, args: _Args, kwargs: _Kwargs, packed: _Packed) -> Any:
    bounds = _range_of(func, args, kwargs)
    if bounds is None:  # (cannot happen: recorded with the same arguments)
        return func(*args, **kwargs)
    low, high, _, in_place = bounds
    with torch.no_grad():
        outside = torch.full_like(x, low if low is not None else 0.0)
        if high is not None:
            outside.masked_fill_(unpack_bits(packed[1], x.shape), high)
    result = torch.where(unpack_bits(packed[0], x.shape), x, outside)
    return _in_place(result, x) if in_place else result


# abs: the gradient is sign(x), 0 at 0
def _record_abs(func: Any, x: torch.Tensor, args: _Args, kwargs: _Kwargs) -> _Recorded:
    return func(*args, **kwargs), (pack_bits(x > 0), pack_bits(x < 0))


def _replay_abs(func: Any, x: torch.Tensor, args: _Args, kwargs: _Kwargs, packed: _Packed) -> Any:
    positive, negative = unpack_bits(packed[0], x.shape), unpack_bits(packed[1], x.shape)
    return torch.where(positive, x, torch.where(negative, -x, torch.zeros_like(x)))


# max pooling: the gradient goes to the argmax of each window
_POOL_PARAMETERS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _pool_arguments(args: _Args, kwargs: _Kwargs) -> dict[str, Any]:
    bound = dict(zip(_POOL_PARAMETERS, args))
    bound.update(kwargs)
    pair = torch.nn.modules.utils._pair
    kernel = pair(bound["kernel_size"])
    stride = bound.get("stride")
    return dict(kernel=kernel, stride=pair(stride) if stride not in (None, [], ()) else kernel,
                padding=pair(bound.get("padding", 0)), dilation=pair(bound.get("dilation", 1)),
                ceil_mode=bool(bound.get("ceil_mode", False)), indices=bool(bound.get("return_indices", False)))


def _window_grid(p: dict[str, Any], out_shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The top-left input row and column of each output's window (padding included), broadcastable."""
    rows = torch.arange(out_shape[-2], device=device) * p["stride"][0] - p["padding"][0]
    columns = torch.arange(out_shape[-1], device=device) * p["stride"][1] - p["padding"][1]
    return rows.view(-1, 1), columns.view(1, -1)


def _record_max_pool2d(func: Any, x: torch.Tensor, args: _Args, kwargs: _Kwargs) -> _Recorded:
    p = _pool_arguments(args, kwargs)
    if x.dim() not in (3, 4) or p["kernel"][0] * p["kernel"][1] > 256:
        return func(*args, **kwargs), None
    result, indices = F.max_pool2d_with_indices(x, p["kernel"], p["stride"], p["padding"], p["dilation"],
                                                p["ceil_mode"])
    # the argmax as its place in the window (row-major, < 256): 1 byte instead of an int64 index
    width = x.shape[-1]
    top, left = _window_grid(p, indices.shape, x.device)
    offset = (torch.div(indices, width, rounding_mode="floor") - top) // p["dilation"][0] * p["kernel"][1] \
        + (indices % width - left) // p["dilation"][1]
    packed = offset.to(torch.uint8)
    return ((result, indices) if p["indices"] or func is F.max_pool2d_with_indices else result), (packed,)


def _replay_max_pool2d(func: Any, x: torch.Tensor, args: _Args, kwargs: _Kwargs, packed: _Packed) -> Any:
    p = _pool_arguments(args, kwargs)
    offset = packed[0].long()
    top, left = _window_grid(p, offset.shape, x.device)
    rows = top + torch.div(offset, p["kernel"][1], rounding_mode="floor") * p["dilation"][0]
    columns = left + offset % p["kernel"][1] * p["dilation"][1]
    indices = rows * x.shape[-1] + columns
    result = x.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)
    return (result, indices) if p["indices"] or func is F.max_pool2d_with_indices else result


_Handler = tuple[str, Callable[..., Any], Callable[..., Any]]
_HANDLERS: dict[Any, _Handler] = {}
_function: Any
for _function in (F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_, F.relu_):
    _HANDLERS[_function] = ("relu", _record_relu, _replay_relu)
_HANDLERS[F.leaky_relu] = ("leaky_relu", _record_leaky_relu, _replay_leaky_relu)
for _function in (F.hardtanh, F.relu6, torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip,
                  torch.clamp_min, torch.Tensor.clamp_min, torch.clamp_max, torch.Tensor.clamp_max):
    _HANDLERS[_function] = ("clamp", _record_range, _replay_range)
for _function in (torch.abs, torch.Tensor.abs):
    _HANDLERS[_function] = ("abs", _record_abs, _replay_abs)
for _function in (F.max_pool2d, F.max_pool2d_with_indices):
    _HANDLERS[_function] = ("max_pool2d", _record_max_pool2d, _replay_max_pool2d)

#: The functions whose branches are recorded (``Tensor`` methods among them), and the ``Tensor`` methods by name
#: (an fx ``call_method`` node's target).
BRANCH_FUNCTIONS: frozenset[Any] = frozenset(_HANDLERS)
BRANCH_METHODS: frozenset[str] = frozenset({"relu", "relu_", "clamp", "clip", "clamp_min", "clamp_max", "abs"})
