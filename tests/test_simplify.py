"""split_through_cat: a split that undoes a cat reads the pieces themselves, only where nobody can tell."""

import pytest
import torch
import torch.fx as fx
from helpers import assert_close
from torch import nn

import invfx
from invfx.passes import annotate
from invfx.passes.simplify import split_through_cat

DT = torch.float64


class Blocks(nn.Module):
    """Two couplings written plainly: each ends in a cat the next one chunks."""

    def __init__(self, width=8, tail=None):
        super().__init__()
        half = width // 2
        self.f = nn.ModuleList(nn.Sequential(nn.Linear(half, half), nn.Tanh()) for _ in range(4))
        self.tail = tail

    def forward(self, x):
        for i in range(2):
            x1, x2 = x.chunk(2, -1)
            y1 = x1 + self.f[2 * i](x2)
            y2 = x2 + self.f[2 * i + 1](y1)
            x = torch.cat([y1, y2], -1)
        return self.tail(x) if self.tail is not None else x


class CatReadTwice(Blocks):
    def forward(self, x):
        x1, x2 = x.chunk(2, -1)
        y = torch.cat([x1 + self.f[0](x2), x2], -1)
        a, b = y.chunk(2, -1)
        return a * b.sum() + y.mean()  # the cat is read by the chunk and by mean


class OtherCut(Blocks):
    def forward(self, x):
        y = torch.cat([x[:, :4] * 2, x[:, 4:] * 3], -1)
        a, b = y.split([3, 5], -1)  # not the pieces' sizes
        return a.sum(-1) + b.sum(-1)


class OtherDim(Blocks):
    def forward(self, x):
        y = torch.cat([x * 2, x * 3], 0)
        a, b = y.chunk(2, -1)
        return a.sum() + b.sum()


class Promoted(Blocks):
    def forward(self, x):
        y = torch.cat([x, x.to(torch.float32)], -1)  # the cat promotes the float32 piece
        a, b = y.chunk(2, -1)
        return a * b


class WrittenInPlace(Blocks):
    def forward(self, x):
        p = x * 2
        y = torch.cat([p, x * 3], -1)
        a, b = y.chunk(2, -1)
        a.mul_(5)  # the view of the cat shields p from this
        return p + a + b


def traced(model, x):
    module = fx.symbolic_trace(model)
    annotate(module, (x,))
    return module


def ops(module):
    return [n.target for n in module.graph.nodes if n.op in ("call_function", "call_method")]


def test_a_coupling_chain_hands_its_halves_on_apart():
    torch.manual_seed(0)
    model, x = Blocks().to(DT), torch.randn(3, 8, dtype=DT)
    module = traced(model, x)
    assert split_through_cat(module) == 1  # the cat between the blocks; the first chunk and last cat stay
    assert ops(module).count(torch.cat) == 1 and ops(module).count("chunk") == 1
    assert_close(module(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("model", [CatReadTwice, OtherCut, OtherDim, Promoted, WrittenInPlace])
def test_left_alone_where_the_pieces_would_differ(model):
    torch.manual_seed(0)
    model, x = model().to(DT), torch.randn(3, 8, dtype=DT)
    module = traced(model, x)
    before = ops(module)
    assert split_through_cat(module) == 0
    assert ops(module) == before
    assert_close(module(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("model", [Blocks, CatReadTwice, OtherCut])  # (autograd refuses WrittenInPlace)
def test_optimize_gives_the_plain_gradients(model):
    torch.manual_seed(0)
    model = model().to(DT)
    x = torch.randn(3, 8, dtype=DT)
    optimized = invfx.optimize(model, x)
    got = x.clone().requires_grad_()
    want = x.clone().requires_grad_()
    out_got, out_want = optimized(got), model(want)
    assert_close(out_got, out_want)
    params = list(model.parameters())
    grads_got = torch.autograd.grad(out_got.pow(2).sum(), [got, *params], allow_unused=True)
    grads_want = torch.autograd.grad(out_want.pow(2).sum(), [want, *params], allow_unused=True)
    assert grads_want[0] is not None
    for a, b in zip(grads_got, grads_want):
        assert (a is None) == (b is None)
        if b is not None:
            assert_close(a, b)
