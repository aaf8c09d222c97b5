"""invfx.measure: the peak of one training step by allocator replay, median step time, a baseline beside it."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

import invfx
from invfx.memory import cpu_peak_memory


def mlp(width=128, depth=4):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def profiler_running() -> bool:
    return torch.autograd.profiler._is_profiler_enabled


def test_peak_is_the_allocator_replay_of_one_step_after_warm_up():
    model = mlp()
    x = torch.randn(64, 128)
    measured = invfx.measure(model, x, steps=2)

    model(x).sum().backward()  # the same preparation by hand: .grad allocated, then zeroed in place
    for p in model.parameters():
        p.grad.zero_()
    by_hand, _ = cpu_peak_memory(lambda: model(x).sum().backward())
    assert abs(measured.peak_bytes - by_hand) <= 64, (measured.peak_bytes, by_hand)
    assert measured.steps == 2 and measured.device == "cpu" and measured.step_seconds > 0
    assert measured.baseline is None and measured.peak_ratio is None and measured.time_ratio is None
    assert "MiB" in str(measured)
    assert measured.to_dict()["peak_bytes"] == measured.peak_bytes


def test_peak_grows_with_the_batch():
    model = mlp()
    small = invfx.measure(model, torch.randn(64, 128), steps=1).peak_bytes
    large = invfx.measure(model, torch.randn(256, 128), steps=1).peak_bytes
    # the activations are 4 times larger; weights and gradients (not counted) are the same
    assert large > 3 * small, (small, large)


def test_checkpointing_beside_the_plain_model_as_baseline_lowers_the_peak():
    model = mlp(depth=8)
    x = torch.randn(256, 128)

    class Checkpointed(nn.Module):
        def __init__(self, plain):
            super().__init__()
            self.plain = plain

        def forward(self, x):
            return checkpoint_sequential(self.plain, 4, x, use_reentrant=False)

    measured = invfx.measure(Checkpointed(model), x, steps=2, baseline=model)
    assert measured.baseline is not None and measured.baseline.steps == 2
    assert measured.peak_ratio < 1, str(measured)
    assert measured.time_ratio > 0
    assert measured.to_dict()["baseline"]["peak_bytes"] == measured.baseline.peak_bytes
    assert "baseline" in str(measured)


def test_a_callable_and_its_output_containers():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    as_dict = invfx.measure(lambda x: {"y": x @ w, "index": torch.arange(3), "z": (x @ w).tanh()}, x, steps=1)
    assert as_dict.peak_bytes > 0

    calls = []

    def own_backward(x):  # loss=False: the callable is the whole step
        calls.append(1)
        (x @ w).pow(2).sum().backward()

    invfx.measure(own_backward, x, steps=2, loss=False)
    assert len(calls) == 1 + 1 + 3  # warm-up, the profiled step, a warm-up round and two timed rounds


def test_a_custom_loss_and_the_training_mode_restored():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.eval()
    model[1].train()  # a mixed state: each flag comes back as it was
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    target = torch.tensor([0, 1, 2, 0])
    invfx.measure(model, torch.randn(4, 8), steps=1, loss=lambda out: nn.functional.cross_entropy(out, target))
    assert all(seen) and seen
    assert [m.training for m in model.modules()] == [False, False, True, False]


def test_an_optimized_module_plan_gets_the_measurement():
    class Plan:
        recorded = None

        def record_measurement(self, measurement):
            self.recorded = measurement

    model = mlp(width=16, depth=1)
    model.plan = Plan()
    measured = invfx.measure(model, torch.randn(4, 16), steps=1)
    assert model.plan.recorded is measured


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(invfx.InvfxError, match="int"):
        invfx.measure(3, x)
    with pytest.raises(invfx.InvfxError, match="baseline.*str"):
        invfx.measure(nn.Linear(8, 1), x, baseline="plain")
    with pytest.raises(invfx.InvfxError, match="steps"):
        invfx.measure(nn.Linear(8, 1), x, steps=0)
    with pytest.raises(invfx.InvfxError, match="no floating-point tensor"):
        invfx.measure(lambda x: x.argmax(-1), x)
    assert not profiler_running()
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    model.eval()
    with pytest.raises(invfx.InvfxError, match="scalar"):
        invfx.measure(model, x, loss=lambda out: out)
    assert not model.training and not model[0].training
    assert not profiler_running()

    def fails_when_profiled(x):
        if profiler_running():
            raise ValueError("boom")
        return x * w

    w = torch.ones(8, requires_grad=True)
    with pytest.raises(ValueError, match="boom"):
        invfx.measure(fails_when_profiled, x)
    assert not profiler_running()
    assert cpu_peak_memory(lambda: torch.ones(1024))[0] >= 4096  # the profiler can start again
