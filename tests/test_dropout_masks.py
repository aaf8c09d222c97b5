"""Dropout masks kept by checkpoints (invfx.runtime.dropout_masks): the recomputation multiplies by the forward's
mask instead of drawing again. Bit for bit against plain autograd, and the generator where a later op draws."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import CountOps
from torch import nn

import invfx
from invfx.errors import RegionError
from invfx.examples import Transformer
from invfx.modes import Mode
from invfx.runtime import Region, dropout_masks, run_region
from invfx.runtime.dropout_masks import DropoutMasks, recording, records, replaying

DT = torch.float64


def layouts():
    x = torch.randn(4, 6, 5, 5)
    yield "contiguous", x, torch.float32, False
    yield "channels_last", x.contiguous(memory_format=torch.channels_last), torch.float32, False
    yield "transposed", torch.randn(7, 9, dtype=DT).t(), DT, False
    yield "bfloat16", torch.randn(3, 33).bfloat16(), torch.bfloat16, False
    yield "in place", torch.randn(3, 33), torch.float32, True


@pytest.mark.parametrize("case", list(layouts()), ids=lambda c: c[0])
def test_record_and_replay_give_plain_dropouts_values_draws_and_generator(case):
    _, x, dtype, inplace = case
    torch.manual_seed(3)
    expected = F.dropout(x.clone(), 0.3, True, inplace)
    after_expected = torch.rand(4)  # a draw after the dropout sees the generator where plain left it
    masks = DropoutMasks("t")
    torch.manual_seed(3)
    with recording(masks):
        recorded = F.dropout(x.clone(), 0.3, True, inplace)
        after_recorded = torch.rand(4)
    torch.manual_seed(99)  # the replay draws nothing, and sets the generator where the forward had it
    with replaying(masks):
        replayed = F.dropout(x.clone(), 0.3, True, inplace)
        after_replayed = torch.rand(4)
    for got in (recorded, replayed):
        assert got.dtype == dtype and got.stride() == expected.stride()
        assert torch.equal(got, expected)
    assert torch.equal(after_recorded, after_expected) and torch.equal(after_replayed, after_expected)
    assert len(masks) == 1 and masks.masks[0].bits.numel() == (x.numel() + 7) // 8


def test_no_generator_state_is_kept_where_nothing_draws_after_a_dropout():
    a, b = torch.randn(64), torch.randn(64)
    masks = DropoutMasks("t")
    with recording(masks):
        F.dropout(a, 0.5, True)
        F.dropout(b, 0.5, True)
    assert [m.after is None for m in masks.masks] == [True, True]
    assert masks.nbytes == 2 * 64 // 8
    with recording(masks):  # a draw between them: the first keeps the generator's state (5 KB on CPU)
        F.dropout(a, 0.5, True)
        torch.rand(1)
        F.dropout(b, 0.5, True)
    assert [m.after is None for m in masks.masks[2:]] == [False, True]


@pytest.mark.parametrize("x, p, training, expected", [
    (torch.randn(3), 0.5, True, True), (torch.randn(3), 0.0, True, False), (torch.randn(3), 1.0, True, False),
    (torch.randn(3), 0.5, False, False), (torch.zeros(0), 0.5, True, False),
    (torch.arange(3), 0.5, True, False), (torch.randn(3), True, True, False)])
def test_which_dropouts_are_recorded(x, p, training, expected):
    assert records(x, p, training) is expected


class DropoutNet(nn.Module):
    """Two dropouts, a random op between them that is not a dropout, and a dropout in a leaf module whose
    internals (MultiheadAttention's) the record does not see."""

    def __init__(self, width=8):
        super().__init__()
        self.a = nn.Linear(width, width, dtype=DT)
        self.drop = nn.Dropout(0.3)
        self.attention = nn.MultiheadAttention(width, 2, dropout=0.4, batch_first=True, dtype=DT)
        self.b = nn.Linear(width, width, dtype=DT)

    def forward(self, x):
        h = self.drop(torch.tanh(self.a(x)))
        h = h + 0.1 * torch.rand_like(h)
        h = self.attention(h, h, h, need_weights=False)[0]
        return F.dropout(self.b(h), 0.5, self.training) * x


def one_step(function, x, params, seed=5, retain=False):
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    out = function(x)
    loss = out.pow(2).sum()
    loss.backward(retain_graph=retain)
    if retain:
        loss.backward()
    return out.detach(), x.grad, [p.grad.clone() for p in params]


def assert_same_step(got, expected):
    """Output, input gradient and every parameter gradient of two steps (:func:`one_step`) bit for bit."""
    for g, e in zip([got[0], got[1], *got[2]], [expected[0], expected[1], *expected[2]], strict=True):
        assert torch.equal(g, e)


@pytest.fixture
def dropout_net():
    """A :class:`DropoutNet` in training, its parameters and an input."""
    torch.manual_seed(0)
    net = DropoutNet().train()
    return net, list(net.parameters()), torch.randn(3, 5, 8, dtype=DT)


def test_a_checkpoint_replays_its_dropouts_without_drawing_and_trains_as_plain(dropout_net):
    net, params, x = dropout_net
    expected = one_step(net, x, params)
    region = Region(net, name="net", buffers=(net,))
    counting = CountOps()
    with counting:
        got = one_step(lambda t: run_region(region, (t,)), x, params)
    bernoulli = counting.counts[torch.ops.aten.bernoulli_]
    # forward: the 2 recorded and attention's own; the recomputation: attention's only (without masks: 6)
    assert bernoulli == 4, counting.counts
    assert_same_step(got, expected)


def test_without_masks_the_checkpoint_draws_again_and_trains_the_same(dropout_net):
    net, params, x = dropout_net
    with_masks = one_step(lambda t: run_region(Region(net, name="net"), (t,)), x, params)
    counting = CountOps()
    with counting:
        without = one_step(lambda t: run_region(Region(net, name="net", dropout_masks=False), (t,)), x, params)
    assert counting.counts[torch.ops.aten.bernoulli_] == 6
    assert_same_step(with_masks, without)


def test_a_second_backward_draws_again_from_the_restored_generator(dropout_net):
    net, params, x = dropout_net
    expected = one_step(net, x, params, retain=True)
    got = one_step(lambda t: run_region(Region(net, name="net"), (t,)), x, params, retain=True)
    assert_same_step(got, expected)


def test_nested_checkpoints_record_each_their_own_dropouts():
    torch.manual_seed(0)
    inner, outer = DropoutNet().train(), DropoutNet().train()
    params = list(inner.parameters()) + list(outer.parameters())
    x = torch.randn(3, 5, 8, dtype=DT)
    inner_region = Region(inner, name="inner")

    def plain(t):
        return outer(inner(t) + t)

    def nested(t):
        return outer(run_region(inner_region, (t,)) + t)

    def drawing(t):  # both regions draw their dropouts again in the recomputation, as torch's checkpoint does
        return outer(run_region(Region(inner, name="inner", dropout_masks=False), (t,)) + t)

    expected = one_step(plain, x, params)
    got = one_step(lambda t: run_region(Region(nested, name="outer"), (t,)), x, params)
    redrawn = one_step(lambda t: run_region(Region(drawing, name="outer", dropout_masks=False), (t,)), x, params)
    for g, e, r in zip([got[0], got[1], *got[2]], [expected[0], expected[1], *expected[2]],
                       [redrawn[0], redrawn[1], *redrawn[2]]):
        assert torch.equal(g, r)
        # (x's gradient sums its three uses in another order than plain's: 4e-16 apart, masks or not)
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-15)


def test_a_recomputation_that_runs_another_dropout_is_an_error():
    calls = []

    def changing(t):
        calls.append(1)
        return F.dropout(t, 0.3 if len(calls) == 1 else 0.6, True)

    x = torch.randn(4, 4, dtype=DT, requires_grad=True)
    out = run_region(Region(changing, name="changing"), (x,))
    with pytest.raises(RegionError, match=r"changing: the recomputation ran dropout\(p=0.6\)"):
        out.sum().backward()


@pytest.mark.parametrize("budget", [0.8, None])
def test_optimize_keeps_masks_and_trains_as_plain(budget):
    """A transformer with dropout, checkpointed or selective: outputs and every gradient equal plain autograd's
    (float64, the same seed), each recorded dropout drawn once, and the plan states the masks' bytes."""
    torch.manual_seed(0)
    model = Transformer(features=8, dim=16, depth=4, heads=2, hidden=32, dropout=0.2).to(DT).train()
    x = torch.randn(2, 6, 8, dtype=DT)
    # (without recipes for LayerNorm and GELU outputs, 0.8 needs regions on this toy)
    optimized = invfx.optimize(model, x, memory_budget=budget, options=invfx.OptimizeOptions(recompute_saved=False))
    rows = [r for r in optimized.plan.rows if r.mode in (Mode.CHECKPOINT, Mode.SELECTIVE)]
    assert rows, str(optimized.plan)
    dropouts_per_block = 2
    assert any(row.mask_bytes for row in rows), str(optimized.plan)
    for row in rows:
        if row.name.startswith(("ckpt_blocks", "sac_blocks")) and row.nodes > 1:
            assert row.mask_bytes == dropouts_per_block * (2 * 6 * 16) // 8, row
            assert "dropouts' masks" in row.why
    assert all("mask_bytes" in segment for segment in optimized.plan.to_dict()["segments"])
    params = list(model.parameters())
    expected = one_step(model, x, params)
    counting = CountOps()
    with counting, spying_on_the_mode() as mode_calls:
        got = one_step(optimized, x, params)
    assert counting.counts[torch.ops.aten.bernoulli_] == 2 * 4  # once per dropout: none drawn again
    assert mode_calls == []  # (every dropout is in the graph: the bodies call the record themselves)
    assert_same_step(got, expected)


@contextlib.contextmanager
def spying_on_the_mode():
    """The functions the record's torch-function mode saw meanwhile."""
    seen = []
    original = dropout_masks._DropoutMode.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return original(self, func, types, args, kwargs)

    dropout_masks._DropoutMode.__torch_function__ = spy
    try:
        yield seen
    finally:
        dropout_masks._DropoutMode.__torch_function__ = original


class Dropouts(nn.Module):
    """The three ways a graph shows a dropout: an nn.Dropout, F.dropout, and aten.dropout with ``train`` by name
    (as exported graphs may)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(8, 8), nn.Linear(8, 8), nn.Dropout(0.3)

    def forward(self, x):
        h = self.drop(torch.tanh(self.a(x)))
        h = F.dropout(torch.tanh(self.b(h)), 0.4, self.training)
        return torch.ops.aten.dropout.default(torch.sin(h), p=0.2, train=self.training)


def test_bodies_call_the_record_for_every_dropout_they_show_and_train_as_plain():
    from invfx.regions.body import dropouts_called_directly

    torch.manual_seed(0)
    net, x = Dropouts().to(DT).train(), torch.randn(6, 8, dtype=DT)
    body = torch.fx.symbolic_trace(net)
    direct = dropouts_called_directly(body)
    assert "F.dropout" not in direct.code and "aten.dropout" not in direct.code
    assert direct.code.count("dropout_masks_dropout(") == 2 and direct.code.count("module_dropout(") == 1
    params = list(net.parameters())
    expected = one_step(net, x, params)
    counting = CountOps()
    with counting, spying_on_the_mode() as mode_calls:
        got = one_step(lambda t: run_region(Region(direct, name="net", dropouts_marked=True), (t,)), x, params)
    assert counting.counts[torch.ops.aten.bernoulli_] == 3 and mode_calls == []
    assert_same_step(got, expected)
    # one module in eval within a training model: read at the call, so it drops nothing, as in plain
    net.drop.eval()
    expected = one_step(net, x, params)
    got = one_step(lambda t: run_region(Region(direct, name="net", dropouts_marked=True), (t,)), x, params)
    assert_same_step(got, expected)
    # outside a region, the direct calls are the plain dropouts
    torch.manual_seed(3)
    plain = net(x)
    torch.manual_seed(3)
    assert torch.equal(direct(x), plain)


def test_aten_dropout_from_exported_graphs_is_recorded_as_f_dropout():
    x = torch.randn(5, 7)
    torch.manual_seed(2)
    expected = torch.ops.aten.dropout.default(x, 0.4, True)
    masks = DropoutMasks("t")
    torch.manual_seed(2)
    with recording(masks):
        recorded = torch.ops.aten.dropout.default(x, 0.4, True)
    with replaying(masks):
        replayed = torch.ops.aten.dropout.default(x, 0.4, True)
    assert len(masks) == 1 and torch.equal(recorded, expected) and torch.equal(replayed, expected)


def test_only_regions_that_may_drop_record_masks():
    """The record's torch-function mode costs a Python round trip per torch call: a checkpoint whose graph holds
    no dropout (a ResNet block) runs without it; one with a dropout, or with code the tracer did not enter (a
    leaf module of the user's, which may call F.dropout itself), runs with it."""
    from invfx.examples import ResNet
    from invfx.regions.modules import CheckpointRegion

    class UserLeaf(nn.Module):  # calls F.dropout with no nn.Dropout to show for it
        def forward(self, x):
            return F.dropout(x, 0.5, self.training)

    def regions(model, x, **options):
        optimized = invfx.optimize(model, x, modes=("checkpoint",), check_gradients=False, **options)
        found = [m._region() for m in optimized.modules() if isinstance(m, CheckpointRegion) and m.mode != Mode.KEEP]
        assert found, str(optimized.plan)
        return found

    torch.manual_seed(0)
    assert not any(r.dropout_masks for r in regions(ResNet(depth=2, channels=4, in_channels=3).train(),
                                                     torch.randn(2, 3, 8, 8)))
    transformer = Transformer(features=8, dim=16, depth=2, heads=2, hidden=32, dropout=0.2).train()
    found = regions(transformer, torch.randn(2, 6, 8))
    assert any(r.dropout_masks for r in found)
    assert all(r.dropouts_marked for r in found if r.dropout_masks)  # (the graph shows each of them)
    leaf = UserLeaf()
    model = nn.Sequential(nn.Linear(8, 8), leaf, nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).train()
    found = regions(model, torch.randn(4, 8), leaf_modules=[leaf])
    assert any(r.dropout_masks for r in found)
    assert not any(r.dropouts_marked for r in found)  # (only the mode sees the leaf's F.dropout)
