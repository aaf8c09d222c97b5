"""invfx.optimize with the planner: memory budgets, the cost model's choices, the report, BudgetError."""

import copy

import pytest
import torch
from helpers import assert_close
from torch import nn

import invfx
from invfx.examples import ResNet
from invfx.memory import cpu_peak_memory

DT = torch.float64


def training_step(model, x, params):
    for p in params:
        p.grad = None
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


def measured_peak(model, x):
    model(x).sum().backward()  # .grad allocated first: the measured step allocates activations only
    for p in model.parameters():
        p.grad.zero_()
    return cpu_peak_memory(lambda: model(x).sum().backward())[0]


def resnet(depth=8, channels=8):
    torch.manual_seed(0)
    return ResNet(depth=depth, channels=channels)


def test_resnet_under_half_the_plain_memory():
    """Nothing in a ResNet is invertible: the plan checkpoints blocks until the budget is met. Measured peak
    <= 0.5x plain (5% slack), gradients equal, BatchNorm statistics those of one plain step."""
    model = resnet()
    x = torch.randn(8, 3, 16, 16)
    optimized = invfx.optimize(model, x, memory_budget=0.5)
    modes = {r["mode"] for r in optimized.plan.rows}
    assert "checkpoint" in modes and "invertible" not in modes
    assert "ckpt_" in optimized.code

    twin = copy.deepcopy(model)
    params, twin_params = list(model.parameters()), list(twin.parameters())
    got = training_step(optimized, x, params)
    expected = training_step(twin, x, twin_params)
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(model.buffers(), twin.buffers()):  # running stats moved once, as in one plain step
        assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    plain = measured_peak(twin, x)
    peak = measured_peak(optimized, x)
    assert peak <= 0.5 * 1.05 * plain, (peak / plain, str(optimized.plan))


def test_a_larger_budget_never_plans_more_memory_or_more_compute():
    model = resnet(depth=6)
    x = torch.randn(4, 3, 8, 8)
    plans = [invfx.optimize(model, x, memory_budget=b).plan for b in (0.6, 0.7, 0.8, 1.0)]
    for tighter, looser in zip(plans, plans[1:]):
        assert looser.extra_flops <= tighter.extra_flops
    for budget, plan in zip((0.6, 0.7, 0.8, 1.0), plans):
        assert plan.estimated_peak <= budget * plan.plain_peak + 1
    least = invfx.optimize(model, x).plan
    assert least.estimated_peak <= min(p.estimated_peak for p in plans)
    assert all(r["mode"] == "keep" for r in plans[-1].rows)  # the whole plain memory: nothing to recompute


def test_an_impossible_budget_says_the_least_achievable():
    model = resnet(depth=4)
    x = torch.randn(2, 3, 8, 8)
    least = invfx.optimize(model, x).plan
    with pytest.raises(invfx.BudgetError, match="least achievable") as caught:
        invfx.optimize(model, x, memory_budget=0.01)
    assert f"{least.estimated_peak} B" in str(caught.value)
    with pytest.raises(invfx.BudgetError):
        invfx.optimize(model, x, memory_budget=16)  # bytes


@pytest.mark.parametrize("budget", [0.0, 1.5, -3, "half", True, float("nan")])
def test_bad_budgets_are_refused(budget):
    model = resnet(depth=1)
    with pytest.raises(invfx.InvfxError, match="memory_budget"):
        invfx.optimize(model, torch.randn(2, 3, 8, 8), memory_budget=budget)


class SquareChain(nn.Module):
    """Layers of a square linear map and a leaky ReLU: each layer can be kept, checkpointed or inverted.
    Orthogonal weights, as invertible networks initialise them: the inverses stay well-conditioned."""

    def __init__(self, depth=8, width=32):
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LeakyReLU(0.2)) for _ in range(depth))
        for layer in self.layers:
            nn.init.orthogonal_(layer[0].weight)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_square_linear_chain_between_checkpoint_and_invertible():
    """Inverting a layer keeps nothing but costs its inverse on top of the recomputation: the least memory
    takes it; a budget that checkpointing meets takes the cheaper checkpoints. The report says why."""
    torch.manual_seed(0)
    model = SquareChain().to(DT)
    x = torch.randn(16, 32, dtype=DT)
    least = invfx.optimize(model, x)
    rows = least.plan.rows
    assert sum(r["mode"] == "invertible" for r in rows) >= 6
    assert any("keeps nothing" in r["why"] for r in rows if r["mode"] == "invertible")

    # Per layer, a checkpoint frees one activation (the kept input stays) for one forward; inverting frees
    # two for a forward and an inverse: as much per FLOP. Under a budget the plan keeps what fits, inverts
    # the rest, and checkpoints the layer that fills what is left.
    # (selective left out: the comparison here is checkpoint against inverting; test_selective.py has it)
    plans = {b: invfx.optimize(model, x, memory_budget=b, modes=("keep", "checkpoint", "invertible"))
             for b in (0.5, 0.7, 0.9)}
    flops = [plans[b].plan.extra_flops for b in sorted(plans)]
    assert flops == sorted(flops, reverse=True) and flops[0] < least.plan.extra_flops
    # (the stem has no inverse: checkpointed, possibly in one group with the first layers, it says so instead)
    checkpointed = [r for p in plans.values() for r in p.plan.rows
                    if r["mode"] == "checkpoint" and "no inverse found" not in r["why"]]
    assert checkpointed and all("invertible would keep nothing" in r["why"] for r in checkpointed)

    params = list(model.parameters())
    for optimized in (least, *plans.values()):
        assert_close(training_step(optimized, x, params), training_step(model, x, params), rtol=1e-9, atol=1e-11)


def test_only_invertible_is_flat_in_depth():
    """modes=("invertible",): every invertible segment inverted, the rest kept; memory flat in depth."""
    peaks = {}
    for depth in (4, 16):
        torch.manual_seed(0)
        model = SquareChain(depth=depth, width=64).to(DT)
        x = torch.randn(64, 64, dtype=DT)
        optimized = invfx.optimize(model, x, modes=("invertible",))
        assert {r["mode"] for r in optimized.plan.rows} <= {"invertible", "keep"}
        assert sum(r["mode"] == "invertible" for r in optimized.plan.rows) == depth  # a segment per layer
        params = list(model.parameters())
        assert_close(training_step(optimized, x, params), training_step(model, x, params), rtol=1e-6, atol=1e-9)
        peaks[depth] = measured_peak(optimized, x)
    assert peaks[16] <= 1.1 * peaks[4], peaks


def test_compounding_inverse_errors_stop_the_chain():
    """Each leaky ReLU inverse multiplies rebuild errors by 1/slope: in float32, 16 layers of them would give
    gradients off by 100% (measured before this check). The plan replays the chain's rebuild on the example
    and stops inverting where the error passes the tolerance; the report says so; gradients stay close."""
    torch.manual_seed(0)
    model = SquareChain(depth=16, width=64)
    x = torch.randn(64, 64)
    optimized = invfx.optimize(model, x, modes=("invertible",))
    stopped = [r for r in optimized.plan.rows if "rebuilt through the invertible regions after it" in r["why"]]
    assert stopped and all(r["mode"] == "keep" for r in stopped)
    assert any(r["mode"] == "invertible" for r in optimized.plan.rows)
    params = list(model.parameters())
    got, expected = training_step(optimized, x, params), training_step(model, x, params)
    for a, b in zip(got[1], expected[1]):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-4


def test_the_report_and_its_dictionary():
    model = resnet(depth=3)
    x = torch.randn(4, 3, 16, 16)
    optimized = invfx.optimize(model, x, memory_budget=0.9)
    text = str(optimized.plan)
    for word in ("segment", "mode", "kept", "recompute", "risk", "why", "estimated peak", "extra compute"):
        assert word in text
    data = optimized.plan.to_dict()
    assert data["budget"] == 0.9 and data["estimated_peak_bytes"] <= 0.9 * data["plain_peak_bytes"] + 1
    assert data["calibration"]["peak_bytes"] <= data["calibration"]["target_bytes"]
    assert len(data["segments"]) == len(optimized.plan.rows)
    measurement = invfx.measure(optimized, x, steps=2, baseline=model)
    assert "measured" in str(optimized.plan) and optimized.plan.to_dict()["measured"] is not None
    assert measurement.peak_ratio is not None


def test_single_tensor_cuts_are_the_outputs_dominators():
    """Where a plain run is cut (one tensor flows on), in graph terms: the values every path from the inputs
    to the output goes through, the output's dominators in the data-flow graph (networkx)."""
    import networkx as nx
    import torch.fx as fx

    from invfx.passes.segments import _cuttable, live_values

    model = ResNet(depth=3, channels=4)
    traced = fx.symbolic_trace(model)
    invfx.passes.annotate(traced, (torch.randn(2, 3, 8, 8),))  # (tensor metadata: what a cut may carry)
    graph = traced.graph
    nodes = [n for n in graph.nodes if n.op != "get_attr"]
    flow = nx.DiGraph()
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op != "get_attr":
                flow.add_edge(arg, node)
        if node.op == "placeholder":
            flow.add_edge("source", node)
    output = next(n for n in nodes if n.op == "output")
    idom = nx.immediate_dominators(flow, "source")
    dominators, node = set(), idom[output]
    while node != "source":
        dominators.add(node)
        node = idom[node]
    live = live_values(list(graph.nodes))
    single = {v for s in live for v in s if len(s) == 1}
    cuts = {v for v in single if _cuttable(v)}
    assert cuts == {d for d in dominators if _cuttable(d)}
    assert len(cuts) >= 3 + 2  # at least each block's output, the stem's and the head's steps
