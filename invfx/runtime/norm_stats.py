"""BatchNorm statistics kept by a checkpoint, so that its recomputation normalises instead of measuring again.

A checkpoint region recomputes its forward in backward, BatchNorm included. In training a BatchNorm measures
its batch's mean and variance and normalises with them; on a CPU measuring is most of its time: a training
``F.batch_norm`` over a 16x32x32x32 float32 activation took 0.58 ms (``native_batch_norm`` alone 0.50),
normalising with known statistics 0.12 (``addcmul``; medians of 200, 2 threads, 2-core VM), and the
recomputation of a ResNet block runs two of them. The statistics are two numbers a channel (256 bytes for 32
channels). A :class:`NormStatistics` keeps each recorded BatchNorm's ``(mean, invstd)`` from the forward, and
the recomputation normalises with them (:class:`_Normalised`): one pass over the activation, no second update
of the running statistics.

Exactness. The record runs ``torch.native_batch_norm``, the kernel ``nn.BatchNorm`` reaches on a CPU
(``F.batch_norm`` -> ``aten::batch_norm`` -> ``native_batch_norm``), with the module's own arguments and its
``num_batches_tracked`` step, so the forward's values and running statistics are plain autograd's. On a CPU
that kernel normalises contiguous tensors as ``x * alpha + beta`` per channel with ``alpha = invstd * weight``
and ``beta = bias - mean * alpha``, each a fused multiply-add; ``torch.addcmul`` computes both the same way,
so the recomputed output is the forward's, bit for bit (``tests/test_norm_stats.py`` checks float32 and float64,
1-d to 3-d). Whether both contract to a fused multiply-add depends on how torch was built for the machine's
instruction set, so each process checks it once per dtype on small tensors that take the kernel's vector and
tail paths (:func:`exact_here`); where the two differ, BatchNorms are not recorded and recompute as before.
The replay's backward is ``aten::native_batch_norm_backward`` with the forward's statistics, the call plain
autograd's ``NativeBatchNormBackward0`` makes, so the gradients are plain's too. Other layouts
(channels-last), dtypes (half, bfloat16, mixed), devices, autocast, torch.func transforms, eval mode with
running statistics, subclasses of the BatchNorm modules and modules with hooks are not recorded: they run as
they are (the region then restores the running statistics the recomputation updated, as before).

Where the calls are. A region's body calls :func:`module_batch_norm` instead of each ``nn.BatchNorm1d/2d/3d``
it shows, and :func:`batch_norm` instead of each ``F.batch_norm`` (code the tracer went through: timm's
``BatchNormAct2d``) (:func:`invfx.regions.body.norms_called_directly`). Inside a record they record (the
region's forward) or replay (its recomputation) in call order; elsewhere they are ``module(input)`` and
``F.batch_norm``. A function call is known by the tensors it is given (weight, bias, running statistics). A replay takes
the record's next statistics where the call is the module that recorded them (whatever its ``training`` flag
says now: the gradient is the forward's), and raises :class:`~invfx.RegionError` where the input's shape or
dtype differs from the forward's; any other call runs as it is.

Double backward: the replay's backward is not differentiable, and raises under ``create_graph``. A region's
recomputation never runs there (regions raise first), so this costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RegionError

__all__ = ["NormStatistics", "recording", "replaying", "module_batch_norm", "batch_norm", "records", "exact_here",
           "RECORDED_MODULES"]

#: The modules whose forward :func:`module_batch_norm` runs op for op (exactly these types: a subclass may
#: change what its forward does)
RECORDED_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class _Statistics:
    # who measured them, which a replay checks it meets again: the BatchNorm module, or for a function call the
    # tensors it was given (weight, bias, running mean and variance)
    owner: tuple[object, ...]
    shape: torch.Size
    dtype: torch.dtype
    mean: torch.Tensor
    invstd: torch.Tensor


class NormStatistics:
    """The batch statistics of one region call's recorded BatchNorms, in call order. ``nbytes``: what it holds."""

    __slots__ = ("name", "items", "nbytes")

    def __init__(self, name: str = "region") -> None:
        self.name = name
        self.items: list[_Statistics] = []
        self.nbytes = 0

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, owner: tuple[object, ...], x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> None:
        self.items.append(_Statistics(owner, x.shape, x.dtype, mean.detach(), invstd.detach()))
        self.nbytes += mean.untyped_storage().nbytes() + invstd.untyped_storage().nbytes()

    def clear(self) -> None:
        self.items.clear()
        self.nbytes = 0


class _Active:
    __slots__ = ("phase", "statistics", "index")

    def __init__(self, phase: str, statistics: NormStatistics) -> None:
        self.phase, self.statistics, self.index = phase, statistics, 0


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("invfx_norm_stats", default=None)


def records(module: nn.Module, x: Any) -> bool:
    """Whether ``module(x)`` is a BatchNorm whose statistics a record keeps (else it runs as it is): one of
    :data:`RECORDED_MODULES` exactly, normalising with its batch's statistics, without hooks, on a contiguous
    float32 or float64 CPU tensor, its parameters (if any) of the same dtype, outside autocast and torch.func."""
    if type(module) not in RECORDED_MODULES:
        return False
    bn = module
    batch_statistics = bn.training or (bn.running_mean is None and bn.running_var is None)
    return (batch_statistics and not (bn._forward_hooks or bn._forward_pre_hooks or _global_hooks())
            and _normalisable(x, bn.weight, bn.bias))


def _normalisable(x: Any, weight: Any, bias: Any) -> bool:
    """Whether a training batch norm of ``x`` with ``weight`` and ``bias`` may be recorded and replayed."""
    return (type(x) in (torch.Tensor, nn.Parameter) and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and not x.is_nested and x.is_contiguous() and x.dim() >= 2
            and x.numel() > 0
            and all(p is None or (type(p) in (torch.Tensor, nn.Parameter) and p.dtype == x.dtype
                                  and p.device.type == "cpu") for p in (weight, bias))
            and not torch.is_autocast_enabled("cpu") and not torch._C._are_functorch_transforms_active()
            and exact_here(x.dtype))


@functools.cache
def exact_here(dtype: torch.dtype) -> bool:
    """Whether :class:`_Normalised` computes the training kernel's values bit for bit in ``dtype`` on this
    machine: checked on batches of 2-d, 3-d and 4-d inputs whose planes are not whole vectors (the kernel's
    vector and tail paths), without grad, with the default generator untouched."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape in ((67, 5), (3, 5, 37), (2, 5, 4, 9)):
            x = torch.randn(shape, generator=generator, dtype=dtype) * 3 + 1
            weight, bias = torch.randn(5, generator=generator, dtype=dtype), torch.randn(5, generator=generator,
                                                                                          dtype=dtype)
            out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.1, 1e-5)
            if not torch.equal(_Normalised.forward(_NoContext(), x, weight, bias, mean, invstd, 1e-5), out):
                return False
    return True


class _NoContext:
    """What :meth:`_Normalised.forward` writes into, where it runs outside autograd (the check)."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_globals

    return bool(module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def _recorded(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, statistics: NormStatistics) -> torch.Tensor:
    """``bn(x)`` as ``nn.BatchNorm``'s forward runs it, op for op, through the kernel that also returns the batch
    statistics (which ``statistics`` keeps)."""
    bn._check_input_dim(x)  # type: ignore[no-untyped-call]
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    tracked = not bn.training or bn.track_running_stats
    torch.nn.functional._verify_batch_size(x.size())  # type: ignore[attr-defined]  # (F.batch_norm's check)
    if bn.eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn.eps}")
    out, mean, invstd = torch.native_batch_norm(x, bn.weight, bn.bias, bn.running_mean if tracked else None,
                                                bn.running_var if tracked else None, True, factor, bn.eps)
    statistics.add((bn,), x, mean, invstd)
    return out


def module_batch_norm(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """``module(input)``. Run by a region that records statistics, a BatchNorm's batch statistics are recorded
    (the forward) or normalised with (the recomputation): see the module's docstring."""
    active = _ACTIVE.get()
    if active is None:
        out: torch.Tensor = module(input)
        return out
    statistics = active.statistics
    if active.phase == "record":
        if not records(module, input):
            out = module(input)
            return out
        return _recorded(module, input, statistics)  # type: ignore[arg-type]
    # The replay follows the record, whatever the module's flags say now: the forward normalised with these
    # statistics (a module put in eval mode between forward and backward still gets the forward's gradient).
    item = _next(active, (module,), input, type(module).__name__)
    if item is None:
        out = module(input)  # not recorded: it runs as it is (measuring again)
        return out
    bn = module
    out = _Normalised.apply(input, bn.weight, bn.bias, item.mean, item.invstd, bn.eps)  # type: ignore[no-untyped-call]
    return out


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm``, as code the tracer went through calls it (timm's ``BatchNormAct2d``). Run by a region
    that records statistics, a call in training has its batch statistics recorded (the forward) or normalised
    with (the recomputation), known by the tensors it is given; elsewhere it is ``F.batch_norm``."""
    active = _ACTIVE.get()
    owner = (weight, bias, running_mean, running_var)
    if active is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if active.phase == "record":
        if not (training is True and _normalisable(input, weight, bias)):
            return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        F._verify_batch_size(input.size())  # type: ignore[attr-defined]  # (F.batch_norm's checks in training)
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        normalised, mean, invstd = torch.native_batch_norm(input, weight, bias, running_mean, running_var, True,
                                                           momentum, eps)
        active.statistics.add(owner, input, mean, invstd)
        return normalised
    item = _next(active, owner, input, "batch_norm")
    if item is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    out: torch.Tensor = _Normalised.apply(input, weight, bias, item.mean, item.invstd, eps)  # type: ignore[no-untyped-call]
    return out


def _next(active: _Active, owner: tuple[object, ...], x: torch.Tensor, what: str) -> _Statistics | None:
    """The replay's next statistics, where ``owner`` recorded them (else None: the call runs as it is); a
    recorded call on an input of another shape or dtype raises."""
    statistics = active.statistics
    item = statistics.items[active.index] if active.index < len(statistics.items) else None
    if item is None or len(item.owner) != len(owner) or any(a is not b for a, b in zip(item.owner, owner)):
        return None
    if (item.shape, item.dtype) != (x.shape, x.dtype):
        raise RegionError(
            f"{statistics.name}: the recomputation ran {what} {active.index} on {tuple(x.shape)} {x.dtype} where "
            f"the forward ran it on {tuple(item.shape)} {item.dtype}; a region must run the same ops when "
            "recomputed")
    active.index += 1
    return item


class _Normalised(torch.autograd.Function):
    """A training BatchNorm's output from its batch statistics, known: ``x * alpha + beta`` per channel as the
    CPU kernel computes it (see the module's docstring); backward is plain autograd's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                mean: torch.Tensor, invstd: torch.Tensor, eps: float) -> torch.Tensor:
        alpha = invstd if weight is None else invstd * weight
        beta = -(mean * alpha) if bias is None else torch.addcmul(bias, mean, alpha, value=-1)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, invstd)
        return torch.addcmul(beta.view(shape), x, alpha.view(shape))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # (as once_differentiable, without its wrapping: a region raised already)
            raise RegionError("double backward through a BatchNorm normalised with recorded statistics is not "
                              "supported")
        x, weight, mean, invstd = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, wanted)
        return grad_x, grad_weight, grad_bias, None, None, None


@contextlib.contextmanager
def _active(phase: str, statistics: NormStatistics | None) -> Iterator[None]:
    # (None: a region that records none hides an enclosing region's record from the BatchNorms it runs)
    token = _ACTIVE.set(_Active(phase, statistics) if statistics is not None else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def recording(statistics: NormStatistics | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, :func:`module_batch_norm` keeps each recorded BatchNorm's batch statistics in
    ``statistics``. None: nothing is recorded (an enclosing region's record included)."""
    return _active("record", statistics)


def replaying(statistics: NormStatistics | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, :func:`module_batch_norm` normalises with ``statistics``, in order."""
    return _active("replay", statistics)
