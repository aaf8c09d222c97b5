"""Inverses of batch normalisation.

In eval mode BatchNorm is an affine map with the running statistics. In train mode it normalises with the
statistics of the batch, which the output alone cannot give back: the forward is replaced by one that also
returns the batch mean and variance, small extra outputs kept for the inverse (the seed's ``process_outputs``).
The same pair of functions serves both modes, so a plan stays valid when the model switches between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import OpCall, Risk, numel, register_inverse


def _per_channel(value, out):
    return value.reshape((1, -1) + (1,) * (out.dim() - 2)) if value is not None else None


def batch_norm_solve_input(out, mean, var, weight=None, bias=None, eps=1e-5):
    """x from ``out = (x - mean) / sqrt(var + eps) * weight + bias`` (statistics per channel, dim 1)."""
    x = out
    if bias is not None:
        x = x - _per_channel(bias, out)
    if weight is not None:
        x = x / _per_channel(weight, out)
    return x * torch.sqrt(_per_channel(var, out) + eps) + _per_channel(mean, out)


def batch_norm_with_statistics(input, running_mean, running_var, weight=None, bias=None,  # noqa: A002
                               training=False, momentum=0.1, eps=1e-5):
    """``F.batch_norm`` that also returns the statistics it normalised with (the batch's in training)."""
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if training or running_mean is None:
        dims = [d for d in range(input.dim()) if d != 1]
        var, mean = torch.var_mean(input.detach(), dim=dims, unbiased=False)
        return out, mean, var
    return out, running_mean, running_var


def batch_norm_module_with_statistics(module: nn.modules.batchnorm._BatchNorm, input):  # noqa: A002
    """``module(input)`` and the statistics it normalised with (updates running statistics as module does)."""
    out = module(input)
    if module.training or module.running_mean is None:
        dims = [d for d in range(input.dim()) if d != 1]
        var, mean = torch.var_mean(input.detach(), dim=dims, unbiased=False)
        return out, mean, var
    return out, module.running_mean, module.running_var


def _nonzero_weight(weight) -> str | None:
    if isinstance(weight, torch.Tensor) and bool((weight == 0).any()):
        return "a BatchNorm weight is zero: the channel is lost"
    return None


def _functional_condition(call: OpCall) -> str | None:
    if not isinstance(call.arg("training"), bool):
        return "training is not a constant"
    return _nonzero_weight(call.arg("weight"))


def _module_condition(call: OpCall) -> str | None:
    return _nonzero_weight(call.module.weight if call.module.affine else None)


def _cost(call: OpCall) -> float:
    return 4.0 * numel(call.out_meta[0] if call.out_meta else ())


BATCH_NORM = ("input", "running_mean", "running_var", "weight=None", "bias=None", "training=False",
              "momentum=0.1", "eps=1e-05")


def _eval_only(call: OpCall) -> str | None:
    if call.arg("training") is not False:
        return "train mode: the inverse needs the batch statistics (the extra-output rule)"
    return _functional_condition(call)


@register_inverse(F.batch_norm, params=BATCH_NORM, args=("running_mean", "running_var", "weight", "bias", "eps"),
                  needs=("running_mean", "running_var", "weight", "bias"), condition=_eval_only,
                  risk=Risk.MAY_BLOW_UP, cost=_cost)
def batch_norm_eval_inverse(out, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    return batch_norm_solve_input(out, running_mean, running_var, weight, bias, eps)


@register_inverse(F.batch_norm, params=BATCH_NORM, args=("weight", "bias", "eps"), needs=("weight", "bias"),
                  condition=_functional_condition, risk=Risk.MAY_BLOW_UP, cost=_cost,
                  extra_outputs=batch_norm_with_statistics)
def batch_norm_inverse(out, mean, var, weight=None, bias=None, eps=1e-5):
    return batch_norm_solve_input(out, mean, var, weight, bias, eps)


@register_inverse(nn.modules.batchnorm._BatchNorm, module=True, condition=_module_condition, risk=Risk.MAY_BLOW_UP,
                  cost=_cost, extra_outputs=batch_norm_module_with_statistics)
def batch_norm_module_inverse(module, out, mean, var):
    weight = module.weight if module.affine else None
    bias = module.bias if module.affine else None
    return batch_norm_solve_input(out, mean, var, weight, bias, module.eps)
