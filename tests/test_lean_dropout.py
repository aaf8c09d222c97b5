"""LeanDropout (invfx.passes.lean_dropout): an nn.Dropout that saves a byte an element for backward where torch's
CPU dropout saves its float noise. The same draws, values and gradients as plain autograd, bit for bit; the
model's own modules untouched; less memory, measured."""


import pytest
import torch
import torch.nn.functional as F
from helpers import saved_and_loaded
from torch import nn

import invfx
from invfx.examples import Transformer
from invfx.runtime.dropout_masks import LeanDropout, dropout

DT = torch.float64


def cases():
    yield "float64", torch.randn(5, 7, dtype=DT)
    yield "float32 channels_last", torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    yield "bfloat16", torch.randn(4, 33).bfloat16()
    yield "transposed", torch.randn(6, 9).t()


@pytest.mark.parametrize("case", list(cases()), ids=lambda c: c[0])
def test_the_same_draws_values_and_gradients_as_f_dropout_and_a_byte_saved_an_element(case):
    _, base = case
    grad_out = torch.randn_like(base)
    results = []
    for run in (lambda t: F.dropout(t, 0.3, True), lambda t: dropout(t, 0.3, True, lean=True)):
        x = base.clone().requires_grad_()
        torch.manual_seed(7)
        y = run(x)
        after = torch.rand(3)  # (the generator moved on exactly as far)
        saved = list(getattr(y.grad_fn, "saved_tensors", ()))  # (MulBackward0 shows its own as _saved_other)
        y.backward(grad_out)
        results.append((y.detach(), x.grad, after))
    for got, expected in zip(results[1], results[0], strict=True):
        assert torch.equal(got, expected)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, base.shape)]


def test_second_order_gradients_are_plain_autograds():
    base, weight = torch.randn(4, 6, dtype=DT), torch.randn(6, dtype=DT)
    grads = []
    for run in (lambda t: F.dropout(t, 0.5, True), lambda t: dropout(t, 0.5, True, lean=True)):
        x = base.clone().requires_grad_()
        torch.manual_seed(3)
        y = (run(x) * weight).pow(2).sum()
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
        grads.append((g.detach(), gg))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_eval_in_place_no_grad_and_p_outside_the_open_interval_run_as_f_dropout():
    x = torch.randn(8, 8, requires_grad=True)
    module = LeanDropout(nn.Dropout(0.4)).eval()
    assert torch.equal(module(x), x)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = F.dropout(x, 0.4, True)
        torch.manual_seed(1)
        assert torch.equal(dropout(x, 0.4, True, lean=True), expected)
    for p in (0.0, 1.0):
        assert torch.equal(dropout(x, p, True, lean=True), F.dropout(x, p, True))


def test_under_torch_func_transforms_it_is_f_dropout():
    x = torch.randn(5, 4, dtype=DT)
    grads = []
    for run in (lambda t: F.dropout(t, 0.3, True), lambda t: dropout(t, 0.3, True, lean=True)):
        torch.manual_seed(2)
        grads.append(torch.func.grad(lambda t, run=run: run(t).pow(2).sum())(x))
    assert torch.equal(*grads)


def lean_modules(optimized):
    """The LeanDropouts an optimized module calls: its children's, and those its regions' bodies call."""
    found = [m for m in optimized.modules() if isinstance(m, LeanDropout)]
    for region in optimized.children():
        for body in (getattr(region, "forward_body", None),):
            if body is not None:
                found += [m for m in body.modules() if isinstance(m, LeanDropout)]
    return found


def one_step(module, x, params, seed=11):
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    out = module(x)
    out.pow(2).sum().backward()
    return [out.detach()] + [p.grad.clone() for p in params]


def small_transformer():
    torch.manual_seed(0)
    model = Transformer(features=8, dim=16, depth=3, heads=2, hidden=32, dropout=0.2).to(DT).train()
    return model, torch.randn(2, 6, 8, dtype=DT)


@pytest.mark.parametrize("budget", [None, 0.8])
def test_optimize_runs_the_models_dropouts_lean_and_trains_as_plain(budget):
    model, x = small_transformer()
    before = [(name, type(m)) for name, m in model.named_modules()]
    optimized = invfx.optimize(model, x, memory_budget=budget)
    assert [(name, type(m)) for name, m in model.named_modules()] == before  # (the model's own: untouched)
    assert list(optimized.state_dict()) == list(model.state_dict())
    # (a LeanDropout only a region calls is held by its body, not a child: it reads the model's own module)
    lean = {id(m): m for m in lean_modules(optimized)}.values()
    assert sorted(id(m.dropout) for m in lean) == sorted(id(block.drop) for block in model.blocks)
    plan = optimized.plan
    assert sorted(plan.to_dict()["lean_dropouts"]) == [f"lean_blocks_{i}_drop" for i in range(3)]
    # each block's drop runs twice on 2x6x16 float64: 7 bytes an element saved
    assert all(saved == 2 * 2 * 6 * 16 * 7 for saved in plan.lean_dropouts.values())
    assert "3 nn.Dropout modules keep a 1-byte mask" in str(plan)
    params = list(model.parameters())
    for got, expected in zip(one_step(optimized, x, params), one_step(model, x, params), strict=True):
        assert torch.equal(got, expected)
    # eval reaches the model's own modules, from the optimized module or from the model
    model.eval()
    assert torch.equal(optimized(x), model(x)) and not any(m.training for m in model.modules())
    model.train(), optimized.eval()
    assert not model.blocks[0].drop.training and torch.equal(optimized(x), model.eval()(x))


def test_saved_and_loaded_it_stays_lean_and_draws_the_same():
    model, x = small_transformer()
    optimized = invfx.optimize(model, x, memory_budget=0.8, check_gradients=False)
    loaded = saved_and_loaded(optimized)
    assert len({id(m) for m in lean_modules(loaded)}) == 3
    torch.manual_seed(4)
    expected = optimized(x)
    torch.manual_seed(4)
    assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("how", ["budget 1.0", "keep only", "option off", "in place", "p = 0"])
def test_where_dropouts_are_left_as_they_are(how):
    model, x = small_transformer()
    for block in model.blocks:
        block.drop.inplace = how == "in place"
        block.drop.p = 0.0 if how == "p = 0" else block.drop.p  # (saves nothing: nothing to say it saved)
    kwargs = {"budget 1.0": {"memory_budget": 1.0}, "keep only": {"modes": ("keep",)},
              "option off": {"options": invfx.OptimizeOptions(lean_dropout=False)}}.get(how, {})
    optimized = invfx.optimize(model, x, check_gradients=False, **kwargs)
    assert not lean_modules(optimized)
    assert not optimized.plan.lean_dropouts and "nn.Dropout modules keep" not in str(optimized.plan)


def test_kept_segments_measure_less_memory_by_what_the_plan_says():
    """Every segment kept (a budget in bytes above plain's peak): the measured peak falls by most of what the
    plan says the LeanDropouts save (the peak comes inside backward, once the last dropout's mask is freed)."""
    torch.manual_seed(0)
    model = Transformer(features=16, dim=64, depth=3, heads=2, hidden=128, dropout=0.1).train()
    x = torch.randn(4, 32, 16)
    plain = invfx.measure(model, x, steps=1).peak_bytes
    lean = invfx.optimize(model, x, memory_budget=10 * plain, check_gradients=False,
                          options=invfx.OptimizeOptions(recompute_saved=False))  # (the dropouts' share alone)
    assert all(row.mode == "keep" for row in lean.plan.rows)
    saved = sum(lean.plan.lean_dropouts.values())
    assert saved == 3 * 2 * (4 * 32 * 64) * 3
    measured = invfx.measure(lean, x, steps=1).peak_bytes
    assert 2 / 3 * saved <= plain - measured <= saved
