"""Plans weighed by measured time (issue 17): the cost pass times each node on the example, the planner minimizes
extra time where every segment has one; ``OptimizeOptions(compute="flops")`` keeps counted FLOPs."""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import invfx
from invfx.examples import ResNet
from invfx.passes.cost import node_seconds


def _model():
    torch.manual_seed(0)
    return ResNet(depth=3, channels=8).train(), torch.randn(4, 3, 16, 16)


def test_node_seconds_times_every_compute_node_and_leaves_the_model_as_it_was():
    model, x = _model()
    traced = fx.symbolic_trace(model)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    seconds = node_seconds(traced, (x,))
    compute = [n.name for n in traced.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    assert sorted(seconds) == sorted(compute)
    assert all(s > 0 for s in seconds.values())
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name  # (BatchNorm's running statistics restored)


def test_a_budgeted_plan_says_its_extra_time():
    model, x = _model()
    opt = invfx.optimize(model, x, memory_budget=0.8)
    plan = opt.plan
    assert plan.extra_seconds is not None and plan.forward_seconds > 0
    assert 0 < plan.extra_seconds
    assert "planned on measured time" in str(plan)
    as_dict = plan.to_dict()
    assert as_dict["extra_seconds"] == plan.extra_seconds and as_dict["forward_seconds"] == plan.forward_seconds


def test_flops_plans_are_the_same_every_time():
    model, x = _model()
    options = invfx.OptimizeOptions(compute="flops")
    plans = [invfx.optimize(model, x, memory_budget=0.8, options=options).plan for _ in range(2)]
    assert [r.mode for r in plans[0].rows] == [r.mode for r in plans[1].rows]
    assert plans[0].extra_seconds is None and "planned on measured time" not in str(plans[0])


def test_timed_plans_train_with_plain_gradients():
    model, x = _model()
    labels = torch.randint(0, 10, (4,))
    reference = copy.deepcopy(model)
    opt = invfx.optimize(model, x, memory_budget=0.8)  # (optimize's own float64 check ran too)
    for module in (reference, opt):
        module.zero_grad()
        F.cross_entropy(module(x), labels).backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("compute", ["seconds", "", None, 1])
def test_an_unknown_compute_is_refused(compute):
    with pytest.raises(invfx.InvfxError, match="compute must be 'time' or 'flops'"):
        invfx.OptimizeOptions(compute=compute)
