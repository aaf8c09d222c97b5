"""Inverses of elementwise bijections: exp/log, expm1/log1p, tanh/atanh, sigmoid/logit, leaky_relu, elu,
softplus (functions, Tensor methods and modules)."""

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Risk, register_inverse


def _pair(forward_targets, inverse_fn, risk, flops=1, params=("input",)):
    register_inverse(*forward_targets, params=params, risk=risk,
                     cost=lambda call: flops * _numel(call))(inverse_fn)


def _numel(call):
    shape = call.out_meta[0] if call.out_meta else ()
    n = 1
    for size in shape:
        n *= size
    return n


def log_inverse(out):
    return torch.exp(out)


def exp_inverse(out):
    return torch.log(out)  # exp underflows to 0 below about -745 (float64): log gives -inf there


def log1p_inverse(out):
    return torch.expm1(out)


def expm1_inverse(out):
    return torch.log1p(out)


def atanh_inverse(out):
    return torch.tanh(out)


def tanh_inverse(out):
    return torch.atanh(out)  # blows up as |out| -> 1


def logit_inverse(out):
    return torch.sigmoid(out)


def sigmoid_inverse(out):
    return torch.logit(out)  # blows up as out -> 0 or 1


_pair((torch.exp, "exp"), exp_inverse, Risk.MAY_BLOW_UP, flops=4)
_pair((torch.log, "log"), log_inverse, Risk.WELL_CONDITIONED, flops=4)
_pair((torch.expm1, "expm1"), expm1_inverse, Risk.MAY_BLOW_UP, flops=4)
_pair((torch.log1p, "log1p"), log1p_inverse, Risk.WELL_CONDITIONED, flops=4)
_pair((torch.tanh, "tanh", F.tanh, nn.Tanh), tanh_inverse, Risk.MAY_BLOW_UP, flops=6)
_pair((torch.atanh, "atanh"), atanh_inverse, Risk.WELL_CONDITIONED, flops=6)
_pair((torch.sigmoid, "sigmoid", F.sigmoid, torch.special.expit, nn.Sigmoid), sigmoid_inverse, Risk.MAY_BLOW_UP,
      flops=6)


def _logit_condition(call):
    eps = call.arg("eps")
    return None if eps is None else f"eps={eps} clamps the input: not invertible"


register_inverse(torch.logit, "logit", torch.special.logit, params=("input", "eps=None"),
                 condition=_logit_condition, risk=Risk.WELL_CONDITIONED)(logit_inverse)


# leaky_relu: y = x if x >= 0 else slope * x; invertible for slope > 0


def _not_inplace(call):
    inplace = call.module.inplace if call.module is not None else call.arg("inplace")
    return "in place: the input is overwritten" if inplace else None


def _slope(call):
    return call.module.negative_slope if call.module is not None else call.arg("negative_slope")


def _leaky_condition(call):
    slope = _slope(call)
    if not isinstance(slope, (int, float)) or slope <= 0:
        return f"negative_slope is {slope!r}; invertible only when > 0"
    return _not_inplace(call)


@register_inverse(F.leaky_relu, params=("input", "negative_slope=0.01", "inplace=False"), args=("negative_slope",),
                  needs=(), condition=_leaky_condition, risk=Risk.WELL_CONDITIONED, cost=lambda c: 2 * _numel(c))
def leaky_relu_inverse(out, negative_slope=0.01):
    return torch.where(out >= 0, out, out / negative_slope)


@register_inverse(nn.LeakyReLU, module=True, condition=_leaky_condition, risk=Risk.WELL_CONDITIONED,
                  cost=lambda c: 2 * _numel(c))
def leaky_relu_module_inverse(module, out):
    return leaky_relu_inverse(out, module.negative_slope)


# elu: y = x if x > 0 else alpha * (exp(x) - 1); invertible for alpha > 0 (y > -alpha)


def _elu_condition(call):
    alpha = call.module.alpha if call.module is not None else call.arg("alpha")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        return f"alpha is {alpha!r}; invertible only when > 0"
    return _not_inplace(call)


@register_inverse(F.elu, params=("input", "alpha=1.0", "inplace=False"), args=("alpha",), needs=(),
                  condition=_elu_condition, risk=Risk.MAY_BLOW_UP, cost=lambda c: 5 * _numel(c))
def elu_inverse(out, alpha=1.0):
    return torch.where(out > 0, out, torch.log1p(out / alpha))  # blows up as out -> -alpha


@register_inverse(nn.ELU, module=True, condition=_elu_condition, risk=Risk.MAY_BLOW_UP, cost=lambda c: 5 * _numel(c))
def elu_module_inverse(module, out):
    return elu_inverse(out, module.alpha)


# softplus: y = log(1 + exp(beta x)) / beta, and y = x where beta x > threshold


def _softplus_condition(call):
    beta = call.module.beta if call.module is not None else call.arg("beta")
    return None if isinstance(beta, (int, float)) and beta > 0 else f"beta is {beta!r}; must be > 0"


@register_inverse(F.softplus, params=("input", "beta=1.0", "threshold=20.0"), args=("beta", "threshold"), needs=(),
                  condition=_softplus_condition, risk=Risk.MAY_BLOW_UP, cost=lambda c: 6 * _numel(c))
def softplus_inverse(out, beta=1.0, threshold=20.0):
    scaled = out * beta
    # log(expm1(z)) = z + log(-expm1(-z)) stays accurate for large z; blows up as out -> 0
    return torch.where(scaled > threshold, out, (scaled + torch.log(-torch.expm1(-scaled))) / beta)


@register_inverse(nn.Softplus, module=True, condition=_softplus_condition, risk=Risk.MAY_BLOW_UP,
                  cost=lambda c: 6 * _numel(c))
def softplus_module_inverse(module, out):
    return softplus_inverse(out, module.beta, module.threshold)
