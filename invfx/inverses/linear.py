"""Inverses of square linear maps: ``F.linear`` / ``nn.Linear`` with a square weight, and 1x1 convolutions
with a square kernel (Glow's invertible 1x1 convolution). Solved with an LU factorisation that is computed once
per weight version (an optimizer step bumps it), not once per call."""

from __future__ import annotations

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


def _square_1x1(call: OpCall) -> str | None:
    if call.module is not None:
        m = call.module
        shape, stride, padding, dilation, groups = tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups
    else:
        shape = _shape_of(call, "weight")
        stride, padding, dilation, groups = (call.arg(n) for n in ("stride", "padding", "dilation", "groups"))
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
