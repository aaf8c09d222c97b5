"""Inverses of add, sub, neg, mul and div, with the other operand known.

The unknown operand must have the output's shape: a broadcast operand is not determined elementwise.
"""

import operator

import torch

from ..registry import OpCall, Risk, provably_nonzero, register_inverse, writes_into

ADD = ("input", "other", "*", "alpha=1")
BINARY = ("input", "other")
DIV = ("input", "other", "*", "rounding_mode=None")


def _checks(*conditions):
    def condition(call: OpCall):
        for check in conditions:
            reason = check(call)
            if reason is not None:
                return reason
        return None
    return condition


def _not_broadcast(solves):
    def condition(call: OpCall):
        shape = call.shape(solves)
        out = tuple(call.out_meta[0]) if call.out_meta else None
        if shape is not None and out is not None and shape != out:
            return f"{solves} {shape} is broadcast to {out}"
        return None
    return condition


def _alpha_ok(call: OpCall):
    alpha = call.bound.get("alpha", 1)
    return None if isinstance(alpha, (int, float)) and alpha != 0 else f"alpha is {alpha!r}"


def _number(name):
    def condition(call: OpCall):
        value = call.arg(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name} is not a number"
        return provably_nonzero(call, name)
    return condition


def _nonzero_tensor(name):
    def condition(call: OpCall):
        if isinstance(call.arg(name), (int, float)):
            return f"{name} is a number"
        return provably_nonzero(call, name)
    return condition


def _nonzero(name):
    return lambda call: provably_nonzero(call, name)


def _true_division(call: OpCall):
    mode = call.bound.get("rounding_mode")
    return None if mode is None else f"rounding_mode={mode!r} loses information"


def _with_alpha(known):
    """Bind the known operand, and alpha when it is not 1."""
    def bind(call: OpCall):
        alpha = call.bound.get("alpha", 1)
        return (call.arg(known),), ({"alpha": alpha} if alpha != 1 else {})
    return bind


def _rule(inverse, *, solves, known, conditions=(), risk=Risk.WELL_CONDITIONED, torch_targets=(),
          torch_params=ADD, operator_targets=(), operator_params=BINARY):
    """Register ``inverse`` for the torch/method forms (with alpha or rounding_mode) and the operator form."""
    checks = (_not_broadcast(solves), *conditions)
    if torch_targets:
        register_inverse(*torch_targets, solves=solves, params=torch_params, bind=_with_alpha(known), needs=(known,),
                         condition=_checks(_alpha_ok, *checks), risk=risk)(inverse)
    if operator_targets:
        register_inverse(*operator_targets, solves=solves, params=operator_params, args=(known,),
                         condition=_checks(*checks), risk=risk)(inverse)


def _same_shape_and_dtype(buffer, *operands) -> bool:
    """Whether the elementwise result of ``operands`` (tensors of ``buffer``'s shape, dtype and device, or Python
    numbers with a floating buffer) is what ``buffer`` holds: ``out=`` would otherwise resize the buffer (a freed
    input's own storage) or cast. Anything else, broadcasting included, is declined: the copy path handles it.
    (Checked by hand: ``torch.broadcast_shapes`` costs tens of microseconds per step.)"""
    for operand in operands:
        if isinstance(operand, torch.Tensor):
            if operand.shape != buffer.shape or operand.dtype != buffer.dtype or operand.device != buffer.device:
                return False
        elif not (isinstance(operand, (int, float)) and buffer.is_floating_point()):
            return False
    return True


def _into(op):
    """``op(out, other, **kwargs)`` (the inverse, as one torch op) written into ``buffer``, or None."""
    def into(buffer, out, other, **kwargs):
        return op(out, other, **kwargs, out=buffer) if _same_shape_and_dtype(buffer, out, other) else None
    return into


@writes_into(_into(torch.sub))
def add_solve_input(out, other, alpha=1):
    """input from ``out = input + alpha * other``."""
    return out - other if alpha == 1 else out - alpha * other


def add_solve_other(out, input, alpha=1):  # noqa: A002 - the forward's name
    """other from ``out = input + alpha * other``."""
    return out - input if alpha == 1 else (out - input) / alpha


@writes_into(_into(torch.add))
def sub_solve_input(out, other, alpha=1):
    """input from ``out = input - alpha * other``."""
    return out + other if alpha == 1 else out + alpha * other


def sub_solve_other(out, input, alpha=1):  # noqa: A002
    """other from ``out = input - alpha * other``."""
    return input - out if alpha == 1 else (input - out) / alpha


@writes_into(_into(torch.div))
def mul_solve_input(out, other):
    """input from ``out = input * other``, other non-zero."""
    return out / other


def mul_solve_other(out, input):  # noqa: A002
    """other from ``out = input * other``, input non-zero."""
    return out / input


@writes_into(_into(torch.mul))
def div_solve_input(out, other):
    """input from ``out = input / other``: multiplying back keeps the relative error, whatever ``other`` is."""
    return out * other


for _inverse, _solves, _known, _targets, _operator in (
        (add_solve_input, "input", "other", (torch.add, "add"), operator.add),
        (add_solve_other, "other", "input", (torch.add, "add"), operator.add),
        (sub_solve_input, "input", "other", (torch.sub, "sub"), operator.sub),
        (sub_solve_other, "other", "input", (torch.sub, "sub"), operator.sub)):
    _rule(_inverse, solves=_solves, known=_known, torch_targets=_targets, operator_targets=(_operator,))

for _solves, _known, _inverse in (("input", "other", mul_solve_input), ("other", "input", mul_solve_other)):
    # dividing by a fixed number bounds the error; dividing by data (exp, sigmoid outputs) does not
    _rule(_inverse, solves=_solves, known=_known, conditions=(_number(_known),),
          operator_targets=(torch.mul, "mul", operator.mul))
    _rule(_inverse, solves=_solves, known=_known, conditions=(_nonzero_tensor(_known),), risk=Risk.MAY_BLOW_UP,
          operator_targets=(torch.mul, "mul", operator.mul))

_rule(div_solve_input, solves="input", known="other", conditions=(_true_division, _nonzero("other")),
      torch_targets=(torch.div, "div"), torch_params=DIV)
_rule(div_solve_input, solves="input", known="other", conditions=(_nonzero("other"),),
      operator_targets=(operator.truediv,))


@register_inverse(torch.neg, "neg", operator.neg, params=("input",))
def neg_inverse(out):
    return -out
