"""BatchNorm statistics kept by checkpoints (invfx.runtime.norm_stats): the recomputation normalises with the
forward's batch statistics instead of measuring again. Bit for bit against plain autograd: values, gradients and
running statistics."""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from helpers import CountOps
from torch import nn

import invfx
from invfx.errors import RegionError
from invfx.examples import ResNet
from invfx.passes.cost import node_seconds
from invfx.regions.body import norms_called_directly
from invfx.runtime import Region, run_region
from invfx.runtime.norm_stats import (
    NormStatistics,
    batch_norm,
    module_batch_norm,
    recording,
    records,
    replaying,
)

BN = torch.ops.aten.native_batch_norm


def cases():
    for dtype in (torch.float32, torch.float64):
        yield nn.BatchNorm1d(6), (16, 6), dtype
        yield nn.BatchNorm1d(5, momentum=None), (4, 5, 7), dtype
        yield nn.BatchNorm2d(6), (4, 6, 5, 5), dtype
        yield nn.BatchNorm2d(32, affine=False), (8, 32, 9, 9), dtype
        yield nn.BatchNorm2d(6, track_running_stats=False), (4, 6, 3, 3), dtype
        yield nn.BatchNorm3d(3), (2, 3, 4, 5, 6), dtype


def _with_params(bn, dtype):
    bn = bn.to(dtype).train()
    with torch.no_grad():
        for p in bn.parameters():
            p.uniform_(-2, 2)
    return bn


@pytest.mark.parametrize("case", list(cases()), ids=lambda c: f"{type(c[0]).__name__}{list(c[1])}-{c[2]}")
def test_record_and_replay_are_plain_batchnorm_bit_for_bit(case):
    module, shape, dtype = case
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype) * 3 + 1
    plain_bn = _with_params(copy.deepcopy(module), dtype)
    bn = copy.deepcopy(plain_bn)
    leaf = x.clone().requires_grad_()
    expected = plain_bn(leaf)
    grad = torch.randn_like(expected)
    expected.backward(grad)

    statistics = NormStatistics("t")
    with torch.no_grad(), recording(statistics):
        recorded = module_batch_norm(bn, x)
    assert torch.equal(recorded, expected.detach())
    for (name, ours), theirs in zip(bn.named_buffers(), plain_bn.buffers()):  # (the module's own update)
        assert torch.equal(ours, theirs), name
    with torch.no_grad(), recording(statistics):
        recorded_twice = module_batch_norm(bn, x * 2)  # (a second call: a second record, in order)
    assert len(statistics) == 2 and statistics.nbytes == 2 * 2 * shape[1] * x.element_size()
    replay_leaf = x.clone().requires_grad_()
    with replaying(statistics):
        replayed = module_batch_norm(bn, replay_leaf)
        replayed_twice = module_batch_norm(bn, x * 2)
    assert torch.equal(replayed, expected) and torch.equal(replayed_twice, recorded_twice)
    replayed.backward(grad)
    assert torch.equal(replay_leaf.grad, leaf.grad)
    for ours, theirs in zip(bn.parameters(), plain_bn.parameters()):
        assert torch.equal(ours.grad, theirs.grad)


def test_the_record_updates_running_statistics_as_the_module_does_and_the_replay_not_at_all():
    torch.manual_seed(1)
    x = torch.randn(8, 4, 3, 3)
    for momentum in (0.1, None):
        plain_bn = nn.BatchNorm2d(4, momentum=momentum).train()
        bn = copy.deepcopy(plain_bn)
        statistics = NormStatistics("t")
        for step in range(3):
            plain_bn(x + step)
            with torch.no_grad(), recording(statistics):
                module_batch_norm(bn, x + step)
        for name, buffer in plain_bn.named_buffers():
            assert torch.equal(getattr(bn, name), buffer), name
        before = {name: b.clone() for name, b in bn.named_buffers()}
        with replaying(statistics):
            for step in range(3):
                module_batch_norm(bn, (x + step).requires_grad_())
        assert all(torch.equal(b, before[name]) for name, b in bn.named_buffers())


def _not_recorded():
    x = torch.randn(4, 6, 5, 5)
    yield "channels_last", nn.BatchNorm2d(6), x.contiguous(memory_format=torch.channels_last)
    yield "bfloat16", nn.BatchNorm2d(6).bfloat16(), x.bfloat16()
    yield "mixed dtypes", nn.BatchNorm2d(6), x.bfloat16()
    yield "eval", nn.BatchNorm2d(6).eval(), x
    yield "SyncBatchNorm", nn.SyncBatchNorm(6), x
    yield "a subclass", type("MyNorm", (nn.BatchNorm2d,), {})(6), x
    hooked = nn.BatchNorm2d(6)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    yield "a hook", hooked, x
    yield "transposed", nn.BatchNorm1d(6), torch.randn(6, 10).t()


@pytest.mark.parametrize("case", list(_not_recorded()), ids=lambda c: c[0])
def test_what_is_not_recorded_runs_as_it_is(case):
    _, module, x = case
    module.train(module.training)
    assert not records(module, x)
    expected = copy.deepcopy(module)(x)
    statistics = NormStatistics("t")
    with torch.no_grad(), recording(statistics):
        assert torch.equal(module_batch_norm(module, x), expected)
    assert not statistics


def test_autocast_is_not_recorded():
    bn, x = nn.BatchNorm2d(6), torch.randn(4, 6, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not records(bn, x)


def test_a_replay_follows_the_record_even_where_the_module_was_put_in_eval_mode():
    torch.manual_seed(2)
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    plain_bn = nn.BatchNorm2d(4).double().train()
    bn = copy.deepcopy(plain_bn)
    leaf = x.clone().requires_grad_()
    plain_bn(leaf).sum().backward()
    statistics = NormStatistics("t")
    with torch.no_grad(), recording(statistics):
        module_batch_norm(bn, x)
    bn.eval()  # (between forward and backward: the forward normalised with the batch's statistics)
    replay_leaf = x.clone().requires_grad_()
    with replaying(statistics):
        module_batch_norm(bn, replay_leaf).sum().backward()
    assert torch.equal(replay_leaf.grad, leaf.grad)


def test_a_replay_meeting_another_shape_raises_and_another_module_runs_as_it_is():
    a, b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    x = torch.randn(8, 4, 3, 3)
    statistics = NormStatistics("block")
    with torch.no_grad(), recording(statistics):
        module_batch_norm(a, x)
    with replaying(statistics), CountOps() as ops:
        module_batch_norm(b, x)  # not the module that recorded: measures again
    assert ops.counts.get(BN, 0) == 1
    with replaying(statistics), pytest.raises(RegionError, match="block: the recomputation ran BatchNorm2d 0"):
        module_batch_norm(a, torch.randn(8, 4, 5, 5))


class Block(nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels, momentum=None)

    def forward(self, x):
        return self.bn2(torch.relu(self.bn(self.conv(x)))) + x


def _step(module, x, retain=False):
    module.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_()
    out = module(leaf)
    out.square().sum().backward(retain_graph=retain)
    if retain:
        out.square().sum().backward()
    return [leaf.grad] + [p.grad for p in module.parameters()], [b.clone() for b in module.buffers()]


@pytest.mark.parametrize("retain", [False, True], ids=["one backward", "retain_graph"])
def test_a_checkpoint_region_replays_statistics_and_trains_as_plain(retain):
    torch.manual_seed(3)
    block = Block().double().train()
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    plain = copy.deepcopy(block)
    expected_grads, expected_buffers = _step(plain, x, retain)

    body, marked = norms_called_directly(fx.symbolic_trace(block))
    assert marked and body.code.count("module_batch_norm(") == 2

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, t):
            return run_region(Region(body, name="block", buffers=(block,), norms_marked=True), (t,))

    wrapped = Wrapped()
    with CountOps() as ops:
        grads, buffers = _step(wrapped, x, retain)
    # forward: 2 BatchNorms; backward: none measured again (a second backward measures again, its first not)
    assert ops.counts[BN] == (4 if retain else 2)
    assert ops.counts[torch.ops.aten.addcmul] >= 2
    for got, want in zip(grads, expected_grads):
        assert torch.equal(got, want)
    for got, want in zip(buffers, expected_buffers):
        assert torch.equal(got, want)


def _optimized_like_plain(model, x, budget, loss):
    """``optimize(model, x, budget)``: its checkpoints replay their BatchNorms, one step of it runs none again in
    backward and matches a plain step bit for bit (gradients, running statistics); how many ran in forward."""
    plain = copy.deepcopy(model)
    opt = invfx.optimize(model, x, memory_budget=budget, check_gradients=False)
    regions = [m for m in opt.modules() if getattr(m, "invfx_region", False) and m.mode != "keep"]
    assert regions and all(r._region().norms_marked for r in regions)
    with CountOps() as ops:
        out = opt(x)
        forward_bns = ops.counts[BN]
        loss(out).backward()
    assert ops.counts[BN] == forward_bns  # (the recomputation measured none again)
    loss(plain(x)).backward()
    for (name, p), q in zip(plain.named_parameters(), opt.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(plain.named_buffers(), opt.buffers()):
        assert torch.equal(b, c), name
    return forward_bns


def test_optimize_recomputes_a_resnets_batchnorms_from_their_statistics():
    torch.manual_seed(4)
    model = ResNet(depth=6, channels=8, classes=10, in_channels=3).double().train()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    assert _optimized_like_plain(model, x, 0.6, lambda out: out.square().sum()) == 13


def test_the_cost_model_times_what_a_batchnorms_replay_saves():
    model = fx.symbolic_trace(Block().train())
    replays = {}
    node_seconds(model, (torch.randn(8, 4, 6, 6),), runs=1, replays=replays)
    assert set(replays) == {"bn", "bn2"}
    model.eval()
    replays = {}
    node_seconds(model, (torch.randn(8, 4, 6, 6),), runs=1, replays=replays)
    assert replays == {}  # (eval: nothing recorded)


def test_double_backward_through_a_replayed_batchnorm_raises():
    bn, x = nn.BatchNorm2d(4), torch.randn(8, 4, 3, 3)
    statistics = NormStatistics("t")
    with torch.no_grad(), recording(statistics):
        module_batch_norm(bn, x)
    leaf = x.clone().requires_grad_()
    with replaying(statistics):
        out = module_batch_norm(bn, leaf)
    with pytest.raises(RegionError, match="double backward"):
        torch.autograd.grad(out.square().sum(), leaf, create_graph=True)


def test_the_machine_check_holds_here_and_a_machine_where_it_fails_recomputes_as_before(monkeypatch):
    from invfx.runtime import norm_stats

    assert norm_stats.exact_here(torch.float32) and norm_stats.exact_here(torch.float64)
    monkeypatch.setattr(norm_stats, "exact_here", lambda dtype: False)
    bn, x = nn.BatchNorm2d(4), torch.randn(8, 4, 3, 3)
    assert not records(bn, x)
    statistics = NormStatistics("t")
    with torch.no_grad(), recording(statistics):
        module_batch_norm(bn, x)
    assert not statistics


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: F.batch_norm on its own buffers, then an activation (traced through: not
    a torch.nn module)."""

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return torch.relu(x)


def test_function_calls_record_and_replay_as_f_batch_norm():
    torch.manual_seed(5)
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    weight, bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    plain_mean, plain_var = mean.clone(), var.clone()
    leaf = x.clone().requires_grad_()
    expected = F.batch_norm(leaf, plain_mean, plain_var, weight, bias, True, 0.1, 1e-5)
    expected.square().sum().backward()
    statistics = NormStatistics("t")
    with torch.no_grad(), recording(statistics):
        recorded = batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5)
        batch_norm(x, mean.clone(), var.clone(), weight, bias, False)  # (eval: not recorded)
    assert torch.equal(recorded, expected.detach()) and len(statistics) == 1
    assert torch.equal(mean, plain_mean) and torch.equal(var, plain_var)
    replay_leaf = x.clone().requires_grad_()
    with replaying(statistics), CountOps() as ops:
        other = batch_norm(x, mean.clone(), var.clone(), weight, bias, True)  # (other tensors: measures again)
        replayed = batch_norm(replay_leaf, mean, var, weight, bias, True, 0.1, 1e-5)
    assert ops.counts[BN] == 1 and torch.equal(other, replayed)  # (one measured again: the other call)
    assert torch.equal(replayed, expected)
    replayed.square().sum().backward()
    assert torch.equal(replay_leaf.grad, leaf.grad)
    assert torch.equal(mean, plain_mean) and torch.equal(var, plain_var)  # (not updated again)


def test_optimize_replays_batchnorms_the_tracer_went_through():
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*(nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), BatchNormAct(6),
                                                        nn.Conv2d(6, 6, 3, padding=1), BatchNormAct(6))
                                          for _ in range(6)))

        def forward(self, x):
            return self.blocks(x).mean()

    model = Net().double().train()
    x = torch.randn(8, 6, 16, 16, dtype=torch.float64)
    assert _optimized_like_plain(model, x, 0.6, lambda out: out) == 12
