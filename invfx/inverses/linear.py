"""Inverses of square linear maps: ``F.linear`` / ``nn.Linear`` with a square weight, 1x1 convolutions with a
square kernel (Glow's invertible 1x1 convolution), and products ``x @ M`` (``mm``, ``matmul``) with a square
``M``. Solved with an LU factorisation that is computed once per weight version (an optimizer step bumps it), not
once per call. Also convolutions whose stride is their kernel (each output pixel a square map of one input patch:
the squeezes of i-RevNet and of FrEIA's ``HaarDownsampling``), undone by a transposed convolution with the inverse
maps."""

from __future__ import annotations

import operator
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import OpCall, Risk, numel, register_inverse


class LUCache:
    """LU factors of square weights, keyed by the weight tensor and valid while its version, memory, dtype and device
    are unchanged (``module.to(dtype)`` sets ``param.data`` without moving the version counter)."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        matrix = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], weight.shape[1])
        key = id(weight)
        entry = self._entries.get(key)
        state = (weight._version, weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape))
        if entry is not None and entry[0]() is weight and entry[1] == state:
            return entry[2], entry[3]
        with torch.no_grad():
            dtype = matrix.dtype if matrix.dtype in (torch.float32, torch.float64) else torch.float32
            lu, pivots = torch.linalg.lu_factor(matrix.detach().to(dtype))
        if entry is None:
            weakref.finalize(weight, self._entries.pop, key, None)
        self._entries[key] = (weakref.ref(weight), state, lu, pivots)
        return lu, pivots

    def __len__(self) -> int:
        return len(self._entries)


lu_cache = LUCache()


def _solve_rows(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x with x @ W^T == rows (each row one sample)."""
    lu, pivots = lu_cache.factors(weight)
    return torch.linalg.lu_solve(lu, pivots, rows.to(lu.dtype), left=False, adjoint=True)


def _solve_right(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """x with x @ M == rows."""
    lu, pivots = lu_cache.factors(matrix)
    return torch.linalg.lu_solve(lu, pivots, rows.to(lu.dtype), left=False)


def linear_solve_input(out, weight, bias=None):
    """x from ``out = x @ weight.T + bias`` with a square weight."""
    rows = out.reshape(-1, out.shape[-1])
    if bias is not None:
        rows = rows - bias
    return _solve_rows(rows, weight).reshape(out.shape).to(out.dtype)


def conv1x1_solve_input(out, weight, bias=None):
    """x from ``out = conv2d(x, weight, bias)`` with a (C, C, 1, 1) weight: a linear map per pixel."""
    channels_last = out.movedim(1, -1)
    rows = channels_last.reshape(-1, channels_last.shape[-1])
    if bias is not None:
        rows = rows - bias
    return _solve_rows(rows, weight).reshape(channels_last.shape).movedim(-1, 1).to(out.dtype)


def _shape_of(call: OpCall, name: str):
    value = call.arg(name)
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return call.shape(name)


def _square_linear(call: OpCall) -> str | None:
    shape = tuple(call.module.weight.shape) if call.module is not None else _shape_of(call, "weight")
    if shape is None or len(shape) != 2:
        return f"weight shape {shape} unknown or not 2-D"
    return None if shape[0] == shape[1] else f"weight is {shape[0]}x{shape[1]}, not square"


def _linear_cost(call: OpCall) -> float:
    out = call.out_meta[0] if call.out_meta else ()
    return 2.0 * numel(out) * (out[-1] if out else 0)


@register_inverse(F.linear, params=("input", "weight", "bias=None"), args=("weight", "bias"), needs=("weight",),
                  condition=_square_linear, risk=Risk.MAY_BLOW_UP, cost=_linear_cost)
def linear_inverse(out, weight, bias=None):
    return linear_solve_input(out, weight, bias)


@register_inverse(nn.Linear, module=True, condition=_square_linear, risk=Risk.MAY_BLOW_UP, cost=_linear_cost)
def linear_module_inverse(module, out):
    return linear_solve_input(out, module.weight, module.bias)


def _is(value, *accepted) -> bool:
    return any(value == a for a in accepted)


def _conv_arguments(call: OpCall) -> tuple:
    """A convolution call's weight shape, stride, padding, dilation and groups, from its module or its arguments."""
    if call.module is not None:
        m = call.module
        return tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups
    return (_shape_of(call, "weight"), *(call.arg(n) for n in ("stride", "padding", "dilation", "groups")))


def _square_1x1(call: OpCall) -> str | None:
    shape, stride, padding, dilation, groups = _conv_arguments(call)
    if shape is None or len(shape) != 4:
        return f"weight shape {shape} unknown or not 4-D"
    if shape[0] != shape[1] or tuple(shape[2:]) != (1, 1):
        return f"weight is {tuple(shape)}: invertible only as (C, C, 1, 1)"
    if not _is(stride, 1, (1, 1), [1, 1]):
        return f"stride {stride}"
    if not _is(padding, 0, (0, 0), [0, 0], "valid"):
        return f"padding {padding}"
    if groups != 1:
        return f"groups={groups}"
    del dilation  # irrelevant for a 1x1 kernel
    return None


def _conv_cost(call: OpCall) -> float:
    out = call.out_meta[0] if call.out_meta else ()
    return 2.0 * numel(out) * (out[1] if len(out) > 1 else 0)


@register_inverse(F.conv2d, params=("input", "weight", "bias=None", "stride=1", "padding=0", "dilation=1",
                                    "groups=1"), args=("weight", "bias"), needs=("weight",), condition=_square_1x1,
                  risk=Risk.MAY_BLOW_UP, cost=_conv_cost)
def conv2d_1x1_inverse(out, weight, bias=None):
    return conv1x1_solve_input(out, weight, bias)


@register_inverse(nn.Conv2d, module=True, condition=_square_1x1, risk=Risk.MAY_BLOW_UP, cost=_conv_cost)
def conv2d_1x1_module_inverse(module, out):
    return conv1x1_solve_input(out, module.weight, module.bias)


# x @ M, M square and known: FrEIA's FixedLinearTransform (``x.mm(M) + b``)


def _square_right(call: OpCall) -> str | None:
    shape, other = _shape_of(call, "other"), call.shape("input")
    if shape is None or len(shape) != 2:
        return f"the right operand's shape {shape} is unknown or not 2-D (a batched product is not undone)"
    if shape[0] != shape[1]:
        return f"the right operand is {shape[0]}x{shape[1]}, not square"
    if other is None or len(other) < 1 or other[-1] != shape[0]:
        return "the left operand's shape is unknown"
    return None


def _matmul_cost(call: OpCall) -> float:
    out = call.out_meta[0] if call.out_meta else ()
    return 2.0 * numel(out) * (out[-1] if out else 0)


@register_inverse(torch.mm, "mm", torch.matmul, "matmul", operator.matmul, params=("input", "other"),
                  args=("other",), condition=_square_right, risk=Risk.MAY_BLOW_UP, cost=_matmul_cost)
def matmul_solve_input(out, other):
    """x from ``out = x @ M`` with a square ``M``."""
    rows = out.reshape(-1, out.shape[-1])
    return _solve_right(rows, other).reshape(out.shape).to(out.dtype)


# a convolution whose stride is its kernel: each output pixel is a linear map of one input patch


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _patch_conv(call: OpCall) -> str | None:
    if call.module is not None and call.module.padding_mode != "zeros":
        return f"padding_mode {call.module.padding_mode!r}"
    shape, stride, padding, dilation, groups = _conv_arguments(call)
    if shape is None or len(shape) != 4:
        return f"weight shape {shape} unknown or not 4-D"
    kernel = tuple(shape[2:])
    if kernel == (1, 1):
        return "a 1x1 kernel (the LU rule's)"
    if not isinstance(groups, int) or groups < 1 or shape[0] % groups:
        return f"groups={groups!r}"
    if _pair(stride) != kernel:
        return f"stride {stride} is not the kernel {kernel}: the patches overlap or leave gaps"
    if padding == "valid" or _pair(padding) == (0, 0):
        pass
    else:
        return f"padding {padding}"
    if _pair(dilation) != (1, 1):
        return f"dilation {dilation}"
    if shape[0] // groups != shape[1] * kernel[0] * kernel[1]:
        return f"weight is {shape}: each group's map is not square"
    size = call.shape("input")
    if size is None or len(size) != 4 or size[2] % kernel[0] or size[3] % kernel[1]:
        return f"input {size}: its height and width are not multiples of the kernel (the convolution drops the rest)"
    return None


def conv2d_patches_solve_input(out, weight, bias=None, groups=1):
    """x from ``out = conv2d(x, weight, bias, stride=kernel, groups=groups)``, each group's map square."""
    c_out, c_in, kh, kw = weight.shape
    maps = weight.detach().reshape(groups, c_out // groups, c_in * kh * kw)
    dtype = maps.dtype if maps.dtype in (torch.float32, torch.float64) else torch.float32
    kernel = torch.linalg.inv(maps.to(dtype)).transpose(1, 2).reshape(c_out, c_in, kh, kw).to(out.dtype)
    if bias is not None:
        out = out - bias.reshape(1, -1, 1, 1)
    return F.conv_transpose2d(out, kernel, stride=(kh, kw), groups=groups)


register_inverse(F.conv2d, params=("input", "weight", "bias=None", "stride=1", "padding=0", "dilation=1", "groups=1"),
                 args=("weight", "bias", "groups"), needs=("weight",), condition=_patch_conv, risk=Risk.MAY_BLOW_UP,
                 cost=_conv_cost)(conv2d_patches_solve_input)


@register_inverse(nn.Conv2d, module=True, condition=_patch_conv, risk=Risk.MAY_BLOW_UP, cost=_conv_cost)
def conv2d_patches_module_inverse(module, out):
    return conv2d_patches_solve_input(out, module.weight, module.bias, module.groups)
