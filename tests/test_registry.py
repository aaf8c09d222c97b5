"""Every built-in inverse rule: forward then inverse gives the input back (float64 tight, float32 loose);
conditions refuse what is not invertible, with the reason; user rules are picked up."""

import operator

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import invfx
from invfx.inverses.linear import lu_cache
from invfx.inverses.shape import TupleItem, assemble_tuple
from invfx.registry import OpCall, Risk, all_rules, find_rule, numel, rules_for

TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-3, atol=2e-4)}


def forward(target, args, kwargs, module):
    if module is not None:
        return module(*args, **kwargs)
    if isinstance(target, str):
        return getattr(args[0], target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


def x(*shape, positive=False, dtype=torch.float64, low=None):
    value = torch.randn(*shape, dtype=dtype)
    if positive:
        value = value.abs() + 0.5
    if low is not None:
        value = value.clamp(low, -low)
    return value


def square(n, dtype=torch.float64):
    return torch.randn(n, n, dtype=dtype) + 3 * torch.eye(n, dtype=dtype)


# (id, target, args builder(dtype) -> (args, kwargs, module, producers), solves, known)
CASES = [
    ("add", torch.add, lambda d: ((x(3, 4, dtype=d), x(3, 4, dtype=d)), {"alpha": 2}, None, {}), "input", ["other"]),
    ("add-other", torch.add, lambda d: ((x(3, 4, dtype=d), x(3, 4, dtype=d)), {"alpha": 2}, None, {}), "other",
     ["input"]),
    ("op.add", operator.add, lambda d: ((x(3, 4, dtype=d), 2.5), {}, None, {}), "input", ["other"]),
    ("op.add-other", operator.add, lambda d: ((x(3, 4, dtype=d), x(3, 4, dtype=d)), {}, None, {}), "other",
     ["input"]),
    ("Tensor.add", "add", lambda d: ((x(3, 4, dtype=d), x(3, 4, dtype=d)), {}, None, {}), "input", ["other"]),
    ("sub", torch.sub, lambda d: ((x(3, 4, dtype=d), x(3, 4, dtype=d)), {"alpha": 3}, None, {}), "input",
     ["other"]),
    ("sub-other", torch.sub, lambda d: ((x(3, 4, dtype=d), x(3, 4, dtype=d)), {}, None, {}), "other", ["input"]),
    ("op.sub", operator.sub, lambda d: ((x(3, 4, dtype=d), x(3, 4, dtype=d)), {}, None, {}), "input", ["other"]),
    ("neg", torch.neg, lambda d: ((x(3, 4, dtype=d),), {}, None, {}), "input", []),
    ("op.neg", operator.neg, lambda d: ((x(3, 4, dtype=d),), {}, None, {}), "input", []),
    ("mul-const", torch.mul, lambda d: ((x(3, 4, dtype=d), -0.75), {}, None, {}), "input", ["other"]),
    ("mul-exp", operator.mul, lambda d: ((x(3, 4, dtype=d), torch.exp(x(3, 4, dtype=d))), {}, None,
                                         {"other": torch.exp}), "input", ["other"]),
    ("mul-sigmoid-other", "mul", lambda d: ((torch.sigmoid(x(3, 4, dtype=d)), x(3, 4, dtype=d)), {}, None,
                                            {"input": torch.sigmoid}), "other", ["input"]),
    ("div-const", torch.div, lambda d: ((x(3, 4, dtype=d), 4.0), {}, None, {}), "input", ["other"]),
    ("op.truediv", operator.truediv, lambda d: ((x(3, 4, dtype=d), torch.exp(x(4, dtype=d))), {}, None,
                                                {"other": "exp"}), "input", ["other"]),
    ("exp", torch.exp, lambda d: ((x(3, 4, dtype=d),), {}, None, {}), "input", []),
    ("log", "log", lambda d: ((x(3, 4, dtype=d, positive=True),), {}, None, {}), "input", []),
    ("expm1", torch.expm1, lambda d: ((x(3, 4, dtype=d),), {}, None, {}), "input", []),
    ("log1p", torch.log1p, lambda d: ((x(3, 4, dtype=d, positive=True),), {}, None, {}), "input", []),
    ("tanh", torch.tanh, lambda d: ((x(3, 4, dtype=d, low=-2),), {}, None, {}), "input", []),
    ("Tanh", nn.Tanh, lambda d: ((x(3, 4, dtype=d, low=-2),), {}, nn.Tanh(), {}), "input", []),
    ("atanh", torch.atanh, lambda d: ((torch.tanh(x(3, 4, dtype=d)),), {}, None, {}), "input", []),
    ("sigmoid", torch.sigmoid, lambda d: ((x(3, 4, dtype=d, low=-3),), {}, None, {}), "input", []),
    ("Sigmoid", nn.Sigmoid, lambda d: ((x(3, 4, dtype=d, low=-3),), {}, nn.Sigmoid(), {}), "input", []),
    ("logit", torch.logit, lambda d: ((torch.sigmoid(x(3, 4, dtype=d)),), {}, None, {}), "input", []),
    ("leaky_relu", F.leaky_relu, lambda d: ((x(3, 4, dtype=d), 0.2), {}, None, {}), "input", []),
    ("LeakyReLU", nn.LeakyReLU, lambda d: ((x(3, 4, dtype=d),), {}, nn.LeakyReLU(0.1), {}), "input", []),
    ("elu", F.elu, lambda d: ((x(3, 4, dtype=d, low=-2),), {"alpha": 0.7}, None, {}), "input", []),
    ("ELU", nn.ELU, lambda d: ((x(3, 4, dtype=d, low=-2),), {}, nn.ELU(1.3), {}), "input", []),
    ("softplus", F.softplus, lambda d: ((x(3, 4, dtype=d, low=-3) * 3,), {"beta": 2.0, "threshold": 5.0}, None, {}),
     "input", []),
    ("Softplus", nn.Softplus, lambda d: ((x(3, 4, dtype=d, low=-3),), {}, nn.Softplus(), {}), "input", []),
    ("flip", torch.flip, lambda d: ((x(2, 3, 4, dtype=d), (0, 2)), {}, None, {}), "input", []),
    ("Tensor.flip", "flip", lambda d: ((x(2, 3, 4, dtype=d), 0, 2), {}, None, {}), "input", []),
    ("roll", torch.roll, lambda d: ((x(2, 3, 4, dtype=d), (1, -2), (0, 2)), {}, None, {}), "input", []),
    ("permute", torch.permute, lambda d: ((x(2, 3, 4, dtype=d), (2, 0, 1)), {}, None, {}), "input", []),
    ("Tensor.permute", "permute", lambda d: ((x(2, 3, 4, dtype=d), 1, 2, 0), {}, None, {}), "input", []),
    ("transpose", "transpose", lambda d: ((x(2, 3, 4, dtype=d), 0, -1), {}, None, {}), "input", []),
    ("t", torch.t, lambda d: ((x(3, 4, dtype=d),), {}, None, {}), "input", []),
    ("reshape", torch.reshape, lambda d: ((x(2, 3, 4, dtype=d), (6, 4)), {}, None, {}), "input", []),
    ("view", "view", lambda d: ((x(2, 3, 4, dtype=d), 4, -1), {}, None, {}), "input", []),
    ("flatten", torch.flatten, lambda d: ((x(2, 3, 4, dtype=d), 1), {}, None, {}), "input", []),
    ("unflatten", "unflatten", lambda d: ((x(2, 12, dtype=d), 1, (3, 4)), {}, None, {}), "input", []),
    ("squeeze", torch.squeeze, lambda d: ((x(2, 1, 4, dtype=d), 1), {}, None, {}), "input", []),
    ("unsqueeze", "unsqueeze", lambda d: ((x(2, 4, dtype=d), -1), {}, None, {}), "input", []),
    ("contiguous", "contiguous", lambda d: ((x(4, 3, dtype=d).t(),), {}, None, {}), "input", []),
    ("clone", torch.clone, lambda d: ((x(4, 3, dtype=d),), {}, None, {}), "input", []),
    ("cat", torch.cat, lambda d: (([x(2, 3, dtype=d), x(2, 5, dtype=d)], 1), {}, None, {}), "tensors", []),
    ("stack", torch.stack, lambda d: (([x(2, 3, dtype=d), x(2, 3, dtype=d)],), {"dim": 1}, None, {}), "tensors",
     []),
    ("split", torch.split, lambda d: ((x(6, 3, dtype=d), [2, 4]), {}, None, {}), "input", []),
    ("chunk", "chunk", lambda d: ((x(3, 6, dtype=d), 2, -1), {}, None, {}), "input", []),
    ("unbind", torch.unbind, lambda d: ((x(3, 2, dtype=d), 1), {}, None, {}), "input", []),
    ("pixel_shuffle", F.pixel_shuffle, lambda d: ((x(2, 8, 3, 3, dtype=d), 2), {}, None, {}), "input", []),
    ("pixel_unshuffle", torch.pixel_unshuffle, lambda d: ((x(2, 2, 4, 6, dtype=d), 2), {}, None, {}), "input", []),
    ("Identity", nn.Identity, lambda d: ((x(2, 3, dtype=d),), {}, nn.Identity(), {}), "input", []),
    ("Flatten", nn.Flatten, lambda d: ((x(2, 3, 4, dtype=d),), {}, nn.Flatten(), {}), "input", []),
    ("Unflatten", nn.Unflatten, lambda d: ((x(2, 12, dtype=d),), {}, nn.Unflatten(1, (3, 4)), {}), "input", []),
    ("PixelShuffle", nn.PixelShuffle, lambda d: ((x(1, 4, 2, 2, dtype=d),), {}, nn.PixelShuffle(2), {}), "input",
     []),
    ("PixelUnshuffle", nn.PixelUnshuffle, lambda d: ((x(1, 1, 4, 4, dtype=d),), {}, nn.PixelUnshuffle(2), {}),
     "input", []),
    ("linear", F.linear, lambda d: ((x(5, 4, dtype=d), square(4, d), x(4, dtype=d)), {}, None, {}), "input",
     ["weight", "bias"]),
    ("linear-nobias", F.linear, lambda d: ((x(2, 5, 4, dtype=d), square(4, d)), {}, None, {}), "input", ["weight"]),
    ("Linear", nn.Linear, lambda d: ((x(5, 4, dtype=d),), {}, _module(nn.Linear(4, 4), d), {}), "input", []),
    ("conv2d-1x1", F.conv2d, lambda d: ((x(2, 3, 4, 5, dtype=d), square(3, d).reshape(3, 3, 1, 1),
                                         x(3, dtype=d)), {}, None, {}), "input", ["weight", "bias"]),
    ("Conv2d-1x1", nn.Conv2d, lambda d: ((x(2, 3, 4, 5, dtype=d),), {}, _module(nn.Conv2d(3, 3, 1), d), {}),
     "input", []),
    ("batch_norm-eval", F.batch_norm, lambda d: ((x(6, 3, 4, dtype=d), x(3, dtype=d), x(3, dtype=d, positive=True),
                                                  x(3, dtype=d, positive=True), x(3, dtype=d)), {}, None, {}),
     "input", ["running_mean", "running_var", "weight", "bias"]),
    ("batch_norm-train", F.batch_norm, lambda d: ((x(6, 3, 4, dtype=d), torch.zeros(3, dtype=d),
                                                   torch.ones(3, dtype=d), x(3, dtype=d, positive=True),
                                                   x(3, dtype=d)), {"training": True}, None, {}),
     "input", ["weight", "bias"]),
    ("BatchNorm2d-train", nn.BatchNorm2d, lambda d: ((x(4, 3, 2, 2, dtype=d),), {}, _module(nn.BatchNorm2d(3), d),
                                                     {}), "input", []),
    ("BatchNorm1d-eval", nn.BatchNorm1d, lambda d: ((x(4, 3, dtype=d),), {},
                                                    _module(nn.BatchNorm1d(3), d, train_first=True), {}),
     "input", []),
]


def _module(module, dtype, train_first=False):
    module = module.to(dtype)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():
            module.weight.uniform_(0.5, 2.0)
            module.bias.normal_()
        if train_first:
            module(torch.randn(8, *([3] if isinstance(module, nn.BatchNorm1d) else [3, 2, 2]), dtype=dtype) * 3 + 1)
            module.eval()
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        with torch.no_grad():
            n = module.weight.shape[0]
            module.weight.copy_(square(n, dtype).reshape(module.weight.shape))
    return module


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_then_inverse_gives_the_input_back(case, dtype):
    _, target, build, solves, known = case
    torch.manual_seed(0)
    args, kwargs, module, producers = build(dtype)
    call = OpCall.of(target, args, kwargs, module=module, producers=producers)
    rule, reasons = find_rule(call, solves, known)
    assert rule is not None, reasons
    if rule.extra_outputs is not None:
        out, *extras = rule.extra_outputs(module, *args) if module is not None else \
            rule.extra_outputs(*args, **kwargs)
        assert_close(out, forward(target, args, kwargs, module) if not isinstance(module, nn.BatchNorm2d)
                     else out)  # the module's own forward already ran (its running stats moved once)
    else:
        out, extras = forward(target, args, kwargs, module), ()
    call = OpCall.of(target, args, kwargs, module=module, out=out, producers=producers)
    recovered = rule.apply(call, out, extras)
    expected = call.arg(solves)
    if isinstance(expected, (list, tuple)):
        recovered = list(recovered)
        expected = list(expected)
    assert_close(recovered, expected, **TOLERANCE[dtype], what=rule.name)
    assert isinstance(rule.risk, Risk)
    assert rule.cost(call) >= 0


def test_every_builtin_target_listed_in_the_issue_has_a_rule():
    required = [torch.add, torch.sub, torch.neg, torch.mul, torch.div, operator.add, operator.sub, operator.mul,
                operator.truediv, operator.neg, torch.exp, torch.log, torch.expm1, torch.log1p, torch.tanh,
                torch.atanh, torch.sigmoid, torch.logit, F.leaky_relu, nn.LeakyReLU, F.elu, F.softplus,
                torch.flip, torch.roll, torch.permute, torch.transpose, torch.t, torch.reshape, "view",
                torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, "contiguous", torch.clone, torch.cat,
                torch.stack, torch.split, torch.chunk, torch.unbind, operator.getitem, F.pixel_shuffle,
                F.pixel_unshuffle, nn.Identity, nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle,
                nn.Linear, F.linear, nn.Conv2d, F.conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                F.batch_norm]
    missing = [t for t in required if not rules_for(t)]
    assert not missing
    for rule in all_rules():
        assert rule.name and rule.name != "<lambda>", rule


def test_tuple_items_assemble_and_invert_a_chunk():
    value = torch.randn(4, 6, dtype=torch.float64)
    parts = torch.chunk(value, 3, dim=1)
    items = []
    for index in (2, 0, 1):
        call = OpCall.of(operator.getitem, (parts, index), out=parts[index])
        rule, _ = find_rule(call, "input")
        items.append(rule.apply(call, parts[index]))
    assert all(isinstance(item, TupleItem) for item in items)
    whole = assemble_tuple(items, 3)
    chunk_call = OpCall.of(torch.chunk, (value, 3, 1), out=whole)
    rule, _ = find_rule(chunk_call, "input")
    assert_close(rule.apply(chunk_call, whole), value)
    with pytest.raises(invfx.InverseError, match="not recovered"):
        assemble_tuple(items[:2], 3)
    refused, reasons = find_rule(OpCall.of(operator.getitem, (value, slice(0, 2))), "input")
    assert refused is None and "not an integer" in reasons[0]


def refusal(target, args, kwargs=None, module=None, solves="input", known=(), producers=None, out=None):
    call = OpCall.of(target, args, kwargs or {}, module=module, producers=producers, out=out)
    rule, reasons = find_rule(call, solves, known)
    assert rule is None, f"{rule} accepted {call}"
    return " | ".join(reasons)


def test_conditions_refuse_what_is_not_invertible_and_say_why():
    t = torch.randn(3, 4)
    assert "not square" in refusal(nn.Linear, (t,), module=nn.Linear(4, 5))
    assert "not square" in refusal(F.linear, (t, torch.randn(5, 4)), known=["weight"])
    assert "needs weight" in refusal(F.linear, (t, torch.randn(4, 4)))
    assert "negative_slope is 0" in refusal(F.leaky_relu, (t, 0.0))
    assert "negative_slope is -0.1" in refusal(nn.LeakyReLU, (t,), module=nn.LeakyReLU(-0.1))
    assert "in place" in refusal(nn.LeakyReLU, (t,), module=nn.LeakyReLU(0.1, inplace=True))
    assert "may be zero" in refusal(torch.mul, (t, torch.randn(3, 4)), known=["other"])
    assert "may be zero" in refusal(operator.mul, (t, torch.relu(torch.randn(3, 4))), known=["other"],
                                    producers={"other": torch.relu})
    assert "is 0" in refusal(torch.mul, (t, 0), known=["other"])
    assert "rounding_mode" in refusal(torch.div, (t, 2.0), {"rounding_mode": "floor"}, known=["other"])
    assert "eps=" in refusal(torch.logit, (torch.rand(3), 1e-6))
    assert "alpha is 0" in refusal(F.elu, (t, 0.0))
    assert "beta is -1" in refusal(F.softplus, (t, -1.0))
    assert "(C, C, 1, 1)" in refusal(nn.Conv2d, (torch.randn(1, 3, 4, 4),), module=nn.Conv2d(3, 3, 3))
    assert "stride" in refusal(nn.Conv2d, (torch.randn(1, 3, 4, 4),), module=nn.Conv2d(3, 3, 1, stride=2))
    assert "(C, C, 1, 1)" in refusal(F.conv2d, (torch.randn(1, 2, 4, 4), torch.randn(2, 1, 1, 1)), {"groups": 2},
                                     known=["weight"])
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight[1] = 0
    assert "weight is zero" in refusal(nn.BatchNorm1d, (t[:, :3],), module=bn)
    assert "broadcast" in refusal(torch.add, (t, torch.randn(4)), solves="other", known=["input"], out=t)
    assert "needs other" in refusal(torch.add, (t, t))
    assert rules_for(torch.relu) == []  # relu loses the negative half: never invertible
    with pytest.raises(invfx.InverseError, match="no inverse registered for torch.relu"):
        OpCall.of(torch.relu, (t,))


def test_lu_factorisation_computed_once_per_weight_version():
    weight = nn.Parameter(square(4))
    out = torch.randn(3, 4, dtype=torch.float64)
    calls = []
    original = torch.linalg.lu_factor

    def counting(matrix):
        calls.append(1)
        return original(matrix)

    torch.linalg.lu_factor = counting
    try:
        first = invfx.inverses.linear.linear_solve_input(out, weight)
        invfx.inverses.linear.linear_solve_input(out * 2, weight)
        assert len(calls) == 1
        with torch.no_grad():
            weight.add_(torch.eye(4, dtype=torch.float64))  # an optimizer step bumps the version
        second = invfx.inverses.linear.linear_solve_input(out, weight)
        assert len(calls) == 2
    finally:
        torch.linalg.lu_factor = original
    assert not torch.allclose(first, second)
    assert_close(second @ weight.detach().T, out)
    size = len(lu_cache)
    del weight
    assert len(lu_cache) == size - 1  # the cache dies with the weight


def test_user_registered_rule_is_picked_up():
    @invfx.register_inverse(torch.sinh, risk="well-conditioned", cost=lambda call: 4 * numel(call.out_meta[0]))
    def sinh_inverse(out):
        return torch.asinh(out)

    value = torch.randn(5, dtype=torch.float64)
    call = OpCall.of(torch.sinh, (value,), out=torch.sinh(value))
    rule, _ = find_rule(call, "input")
    assert rule is not None and rule.name == "sinh_inverse" and rule.risk is Risk.WELL_CONDITIONED
    assert rule.cost(call) == 20
    assert_close(rule.apply(call, torch.sinh(value)), value)

    class Doubler(nn.Module):
        def forward(self, x):
            return 2 * x

    @invfx.register_inverse(Doubler, module=True)
    def doubler_inverse(module, out):
        return out / 2

    class SubDoubler(Doubler):
        pass

    call = OpCall.of(SubDoubler, (value,), module=SubDoubler())
    rule, _ = find_rule(call, "input")
    assert rule is not None and rule.name == "doubler_inverse"  # found through the base class
    assert_close(rule.apply(call, 2 * value), value)


def test_condition_that_raises_refuses_with_the_error():
    @invfx.register_inverse(torch.asinh, condition=lambda call: call.arg("nonexistent"))
    def asinh_inverse(out):
        return torch.sinh(out)

    call = OpCall.of(torch.asinh, (torch.randn(3),))
    rule, reasons = find_rule(call, "input")
    assert rule is None and "could not be checked" in reasons[0]


def test_inverses_written_into_a_buffer_decline_what_does_not_fit():
    from invfx.inverses.arithmetic import add_solve_input, mul_solve_input
    from invfx.inverses.shape import split_inverse

    y, f = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    buffer = torch.empty(3, 4, dtype=torch.float64)
    assert add_solve_input.into(buffer, y, f) is buffer and torch.equal(buffer, add_solve_input(y, f))
    assert mul_solve_input.into(buffer, y, 2.0) is buffer and torch.equal(buffer, mul_solve_input(y, 2.0))
    # a result of another shape or dtype would resize or cast the freed storage: declined, buffer untouched
    before = buffer.clone()
    assert add_solve_input.into(torch.empty(3, 1, dtype=torch.float64), y, f) is None
    assert add_solve_input.into(torch.empty(3, 4, dtype=torch.float32), y, f) is None
    assert add_solve_input.into(torch.empty(3, 4, dtype=torch.float64), y, torch.randn(2, 3, 4)) is None
    assert split_inverse.into(torch.empty(3, 5, dtype=torch.float64), [y[:, :2], y[:, 2:]], -1) is None
    assert split_inverse.into(buffer, [y[:, :2], y[:, 2:].float()], -1) is None
    assert torch.equal(buffer, before)
    assert split_inverse.into(buffer, [y[:, :2], y[:, 2:]], -1) is buffer and torch.equal(buffer, y)
