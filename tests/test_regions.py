"""The regions package (issue 16): what trains lives in ``invfx.regions``, nothing in ``invfx.passes`` runs in a
training step, modules saved before the move still load, and registration hooks watch only what regions read."""

import copy
import os
import sys

import pytest
import torch
from helpers import assert_close
from torch import nn

import invfx
from invfx.examples import Glow, RevNetMLP
from invfx.regions import modules as region_modules

HERE = os.path.dirname(os.path.abspath(__file__))


def step(model, x, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad for p in model.parameters()]


def test_a_module_saved_by_invfx_0_1_0_still_loads_and_trains():
    """tests/data/revnet_optimized_0.1.0.pt was written by torch.save before the regions moved out of
    invfx.passes (its pickle names invfx.passes.rewrite.InvertibleRegion and friends)."""
    saved = torch.load(os.path.join(HERE, "data", "revnet_optimized_0.1.0.pt"), weights_only=False)
    optimized, model, x = saved["optimized"], saved["model"], saved["x"]
    regions = [m for m in optimized.modules() if isinstance(m, invfx.regions.BodyRegion)]
    assert {type(r).__name__ for r in regions} == {"CheckpointRegion", "InvertibleRegion"}
    assert all(type(r).__module__ == "invfx.regions.modules" for r in regions)
    assert "inv_blocks_1_to_2" in str(optimized.plan) and optimized.plan.to_dict()["segments"]  # (rows: dicts)
    # the loaded copy has its own parameters: compare it with its own model, which torch.save kept shared
    assert optimized.blocks is model.blocks
    got = step(optimized, x)
    expected = step(model, x)
    assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_nothing_in_passes_runs_in_a_training_step():
    torch.manual_seed(0)
    model = Glow(channels=3, levels=1, depth=3, hidden=8).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    optimized = invfx.optimize(model, x)
    assert any(r["mode"] == "invertible" for r in optimized.plan.rows)
    step(optimized, x)  # (first call: caches made)
    called = set()

    def profile(frame, event, arg):
        if event == "call":
            called.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        step(optimized, x)
    finally:
        sys.setprofile(None)
    passes_dir = os.path.dirname(invfx.passes.__file__)
    regions_dir = os.path.dirname(invfx.regions.__file__)
    assert not [f for f in called if f.startswith(passes_dir)]
    assert [f for f in called if f.startswith(regions_dir)]  # (the profile saw the regions run)


def test_layers_built_elsewhere_do_not_make_regions_rebind():
    torch.manual_seed(0)
    model = RevNetMLP(depth=3, width=8, hidden=8).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    optimized = invfx.optimize(model, x)
    before = region_modules._registrations[0]
    other = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))  # parameters and buffers registered elsewhere
    other.register_buffer("extra", torch.zeros(1))
    assert region_modules._registrations[0] == before
    model.blocks[1].F[1].weight = nn.Parameter(torch.randn(8, 4, dtype=torch.float64))  # one a region reads
    assert region_modules._registrations[0] == before + 1
    expected = step(model, x)
    assert_close(step(optimized, x), expected, rtol=1e-9, atol=1e-12)


class _TracedBatchNorm(nn.BatchNorm2d):
    """Traced through, as timm's BatchNormAct2d is: its running statistics are get_attr nodes of the bodies."""

    def forward(self, x):
        return torch.relu(nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                   True, 0.1, 1e-5))


def _traced_batchnorm_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _TracedBatchNorm(8),
                         *[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _TracedBatchNorm(8)) for _ in range(3)],
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 4))


def test_a_float32_model_with_traced_buffers_passes_the_float64_check_and_converts():
    """``.double()`` replaces buffers without registering them: the float64 gradient check of a float32 model
    crashed ("expected scalar type Double but found Float", timm's mobilenetv3 at its defaults), and so did a
    step of ``optimized.double()``."""
    torch.manual_seed(0)
    model = _traced_batchnorm_net().train()
    x = torch.randn(2, 3, 8, 8)
    optimized = invfx.optimize(model, x)  # (the check runs in float64)
    assert {str(r.mode) for r in optimized.plan.rows} - {"keep"}
    plain = copy.deepcopy(model).double()
    optimized.double()
    assert_close(step(optimized, x.double()), step(plain, x.double()), rtol=1e-9, atol=1e-12)
    assert all(b.dtype == torch.float64 for b in model.buffers() if b.is_floating_point())


class _CountingBatchNorm(_TracedBatchNorm):
    """As timm's BatchNormAct2d: counts its batches itself, then calls F.batch_norm on its buffers."""

    def forward(self, x):
        self.num_batches_tracked.add_(1)
        return super().forward(x)


class _ConvNorm(nn.Module):
    """A convolution and a BatchNorm traced through, in one forward (one segment: selective keeps the conv)."""

    def __init__(self, channels_in, norm):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(channels_in, 8, 3, padding=1), norm(8)

    def forward(self, x):
        return self.norm(self.conv(x)) + 0.5 * self.conv(x)


@pytest.mark.parametrize("norm", [_TracedBatchNorm, _CountingBatchNorm])
@pytest.mark.parametrize("modes", [("keep", "checkpoint"), ("keep", "selective")])
def test_batchnorm_traced_through_updates_its_statistics_once_per_step(norm, modes):
    """F.batch_norm updates the running statistics inside its kernel, bumping no version counter, and a module
    traced through is no module the region calls: the recomputation updated them a second time (timm's
    BatchNormAct2d; measured 0.02-0.08 off plain's after one step). Regions now find those buffers in the graph,
    and the counter it keeps itself is counted by the graph, once per step."""
    torch.manual_seed(0)
    model = nn.Sequential(_ConvNorm(3, norm), *[_ConvNorm(8, norm) for _ in range(3)],
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).to(torch.float64).train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    plain = copy.deepcopy(model)
    optimized = invfx.optimize(model, x, modes=modes)
    assert {str(r.mode) for r in optimized.plan.rows} - {"keep"}, str(optimized.plan)
    # optimize leaves them as they were (tracing ran ``num_batches_tracked.add_(1)`` on the model's own
    # counter, and left it out of the graph: then a step counted nothing, and the two errors hid each other)
    for (name, got), expected in zip(model.named_buffers(), plain.buffers()):
        assert_close(got, expected, rtol=0, atol=0, what=name)
    assert_close(step(optimized, x), step(plain, x), rtol=1e-9, atol=1e-12)
    for (name, got), expected in zip(model.named_buffers(), plain.buffers()):
        assert_close(got, expected, rtol=1e-12, atol=1e-12, what=name)
