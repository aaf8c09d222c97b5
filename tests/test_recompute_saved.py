"""Inputs saved as how to rebuild them (invfx.passes.recompute_saved, invfx.runtime.recompute_saved): a Linear
keeps no copy of the LayerNorm or GELU output it reads; backward rebuilds it from the op's input. Bit for bit
against plain autograd, first and second order; the model's state_dict untouched; less memory, measured."""

import collections
import gc
import weakref

import pytest
import torch
from helpers import saved_and_loaded
from torch import nn

import invfx
from invfx.examples import Transformer
from invfx.passes import pipeline
from invfx.runtime.recompute_saved import RecomputedInput, release_saved

DT = torch.float64


def small_transformer(dropout=0.2):
    torch.manual_seed(0)
    model = Transformer(features=8, dim=16, depth=3, heads=2, hidden=32, dropout=dropout).to(DT).train()
    return model, torch.randn(2, 6, 8, dtype=DT)


def one_step(module, x, params, seed=11, second_order=False):
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    out = module(x)
    loss = out.pow(2).sum()
    if second_order:  # a gradient penalty: backward through the backward
        grads = torch.autograd.grad(loss, params, create_graph=True)
        loss = loss + sum(g.pow(2).sum() for g in grads)
    loss.backward()
    return [out.detach()] + [p.grad if p.grad is None else p.grad.clone() for p in params]


def assert_same(got, expected):
    for g, e in zip(got, expected, strict=True):
        assert (g is None and e is None) or torch.equal(g, e)


def test_a_linear_lets_go_of_its_input_and_backward_rebuilds_it():
    torch.manual_seed(0)
    norm, linear = nn.LayerNorm(8).to(DT), nn.Linear(8, 5).to(DT)
    x = torch.randn(3, 4, 8, dtype=DT, requires_grad=True)
    params = [x, *norm.parameters(), *linear.parameters()]
    value = norm(x)
    out = linear(value)
    assert release_saved(out, value, x, norm) == (1, 0)  # (AddmmBackward0's mat1, a view of value)
    alive = weakref.ref(value)
    del value
    gc.collect()
    assert alive() is None  # nothing keeps the output now
    out.pow(2).sum().backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    linear(norm(x)).pow(2).sum().backward()
    assert_same(got, [p.grad for p in params])


@pytest.mark.parametrize("budget", [None, 0.8])
def test_optimize_trains_as_plain_with_the_models_state_dict(budget):
    model, x = small_transformer()
    optimized = invfx.optimize(model, x, memory_budget=budget)
    if budget != 0.8:  # (and in regions: the recomputation's own saved inputs are let go of, too)
        assert any(row.mode != "keep" for row in optimized.plan.rows), str(optimized.plan)
    rebuilt = optimized.plan.recomputed_saved
    # each block: ln1 -> qkv, ln2 -> fc1, gelu -> fc2
    every = sorted(f"recompute_blocks_{i}_{m}" for i in range(3) for m in ("qkv", "mlp_0", "mlp_2"))
    # (least memory: every rebuild; here a budget with room keeps them too, since dropping them saves a tiny
    # model next to nothing: test_a_budget_with_room_drops_the_rebuilds_it_does_not_need)
    assert sorted(rebuilt) == every
    assert sum(rebuilt.values()) == 3 * (2 * 2 * 6 * 16 + 2 * 6 * 32) * 8
    assert "9 Linear calls keep no copy" in str(optimized.plan)
    assert list(optimized.state_dict()) == list(model.state_dict())
    result = optimized.load_state_dict(model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    params = list(model.parameters())
    assert_same(one_step(optimized, x, params), one_step(model, x, params))
    visits = collections.Counter()
    optimized.apply(lambda m: visits.update([id(m)]))
    assert set(visits.values()) == {1}  # (each module once: the rebuilt Linears too, re-initialising runs once)
    assert all(id(m) in visits for m in model.modules() if m is not model)


class MLP(nn.Module):
    """Pre-norm MLP blocks: LayerNorm -> Linear -> GELU -> Linear, with the residual (CPU attention has no
    second derivative)."""

    def __init__(self, dim=8, hidden=16, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                                  nn.Linear(hidden, dim)) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_second_order_gradients_are_plain_autograds():
    torch.manual_seed(0)
    model, x = MLP().to(DT), torch.randn(4, 5, 8, dtype=DT)
    plain_peak = invfx.measure(model, x, steps=1).peak_bytes
    optimized = invfx.optimize(model, x, memory_budget=10 * plain_peak, check_gradients=False)
    assert all(r.mode == "keep" for r in optimized.plan.rows)
    assert _rebuild_all(optimized) == 6  # (a budget with this much room needs none: every one on, to test them)
    params = list(model.parameters())
    assert_same(one_step(optimized, x, params, second_order=True), one_step(model, x, params, second_order=True))


def test_saved_and_loaded_it_rebuilds_and_draws_the_same():
    model, x = small_transformer()
    optimized = invfx.optimize(model, x, memory_budget=0.8, check_gradients=False)
    loaded = saved_and_loaded(optimized)
    assert any(isinstance(m, RecomputedInput) for m in loaded.children())
    params = list(model.parameters())
    expected = one_step(optimized, x, params)
    loaded_params = list(loaded.parameters())
    got = one_step(loaded, x, loaded_params)
    assert torch.equal(got[0], expected[0])


@pytest.mark.parametrize("how", ["autocast", "caller's hooks", "torch.func"])
def test_where_the_saved_input_is_kept_as_it_is_the_step_is_plains(how):
    model, x = small_transformer(dropout=0.0)
    optimized = invfx.optimize(model, x, memory_budget=0.8, check_gradients=False)
    assert optimized.plan.recomputed_saved
    params = list(model.parameters())
    if how == "torch.func":
        names = [n for n, _ in model.named_parameters()]

        def loss(module, values):
            return torch.func.functional_call(module, dict(zip(names, values)), (x,)).pow(2).sum()

        got = torch.func.grad(lambda v: loss(optimized, v))(tuple(params))
        expected = torch.func.grad(lambda v: loss(model, v))(tuple(params))
        assert_same(got, expected)
        return
    if how == "autocast":
        x = x.float()
        model.float()

    def context():
        if how == "autocast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)

    with context():
        got = one_step(optimized, x, params)
    with context():
        expected = one_step(model, x, params)
    assert_same(got, expected)


class Reads(nn.Module):
    """A LayerNorm output read by a Linear and also by something else, or written in place."""

    def __init__(self, how):
        super().__init__()
        self.how, self.norm, self.a, self.b = how, nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.norm(x)
        if self.how == "also added":
            return self.a(h) + h
        if self.how == "written in place":
            h.mul_(2)
        return self.b(torch.tanh(self.a(h)))


@pytest.mark.parametrize("how", ["also added", "written in place"])
def test_outputs_read_otherwise_or_written_in_place_are_left_as_they_are(how):
    torch.manual_seed(0)
    model, x = Reads(how).to(DT), torch.randn(4, 8, dtype=DT)
    optimized = invfx.optimize(model, x, check_gradients=True)
    assert not optimized.plan.recomputed_saved
    params = list(model.parameters())
    assert_same(one_step(optimized, x, params), one_step(model, x, params))


def test_kept_segments_measure_less_memory_by_what_the_plan_says():
    torch.manual_seed(0)
    model = Transformer(features=16, dim=64, depth=3, heads=2, hidden=128, dropout=0.0).train()
    x = torch.randn(4, 32, 16)
    plain = invfx.measure(model, x, steps=1).peak_bytes
    optimized = invfx.optimize(model, x, memory_budget=10 * plain, check_gradients=False)
    assert all(row.mode == "keep" for row in optimized.plan.rows)
    assert not optimized.plan.recomputed_saved  # (room to spare: no rebuild planned; every one on, to measure)
    assert _rebuild_all(optimized) == 9
    least = invfx.optimize(model, x, check_gradients=False)  # (what the plan says each saves: least memory)
    saved = sum(least.plan.recomputed_saved.values())
    assert saved == 3 * (2 * 4 * 32 * 64 + 4 * 32 * 128) * 4
    measured = invfx.measure(optimized, x, steps=1).peak_bytes
    assert 2 / 3 * saved <= plain - measured <= saved, (plain, measured, saved)


def test_a_budget_with_room_drops_the_rebuilds_it_does_not_need(monkeypatch):
    """A rebuild trades backward time for memory: under a budget the plan keeps only the rebuilds it needs (the
    plan with every rebuild, less those its estimated peak does without, or the plan with none, whichever is
    estimated faster, here with no tolerance for near ties); the RecomputedInputs of the others run their Linear
    as it is, and the report names only those that rebuild."""
    monkeypatch.setattr(pipeline, "REBUILD_TOLERANCE", 0.0)
    model, x = small_transformer()
    params = list(model.parameters())
    least = invfx.optimize(model, x)  # (no budget: least memory, every rebuild)
    assert len(least.plan.recomputed_saved) == 9
    plans = {budget: invfx.optimize(model, x, memory_budget=budget) for budget in (0.99, 0.8)}
    counts = {}
    for budget, optimized in plans.items():
        active = {name for name, m in optimized.named_modules()
                  if isinstance(m, RecomputedInput) and m.active}
        assert active == set(optimized.plan.recomputed_saved)
        counts[budget] = len(active)
        calibration = optimized.plan.calibration
        assert calibration["peak_bytes"] <= calibration["target_bytes"]
        assert_same(one_step(optimized, x, params), one_step(model, x, params))
    assert counts[0.99] < counts[0.8] < 9  # (the more room, the fewer rebuilds)


def _rebuild_all(optimized) -> int:
    """Turn every RecomputedInput of ``optimized`` on (whatever the plan chose); how many there are."""
    modules = [m for m in optimized.modules() if isinstance(m, RecomputedInput)]
    for module in modules:
        module.active = True
    return len(modules)


def test_where_dropping_rebuilds_buys_little_time_the_plan_keeps_the_lower_peak(monkeypatch):
    """Plans within REBUILD_TOLERANCE of a forward's time of the fastest are decided by their estimated peak."""
    model, x = small_transformer()
    monkeypatch.setattr(pipeline, "REBUILD_TOLERANCE", 1e9)
    assert len(invfx.optimize(model, x, memory_budget=0.99).plan.recomputed_saved) == 9
