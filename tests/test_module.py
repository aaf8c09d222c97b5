"""invfx.nn.Module: the InvTorch API, its flags, checks and containers, against plain autograd."""

import contextlib
import io

import pytest
import torch
from helpers import assert_close, grads_of, zero
from torch import nn

import invfx
import invfx.nn as inn
from invfx.runtime.storage import is_freed
from invfx.utils import requires_grad

DT = torch.float64

SEED_EXAMPLE = '''
import torch
from torch import nn

import invfx.nn as inn
from invfx.utils import requires_grad


class InvertibleLinear(inn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features))

    def function(self, inputs, strict=None):
        outputs = inputs @ self.weight.T + self.bias
        if strict:
            requires_grad(outputs, any=(inputs, self.weight, self.bias))
        return outputs

    def inverse(self, outputs, saved=()):
        return (outputs - self.bias) @ self.weight.T.pinverse()
'''

SEED_USAGE = '''
x = torch.randn(10, 3)
model = InvertibleLinear(3, 5)
print('Consistent strict:', model.check_function(x))
print('Is invertible:', model.check_inverse(x))

y = model(x)
print('Output requires_grad:', y.requires_grad)
print('Input was freed:', x.storage().size() == 0)

y.backward(torch.randn_like(y))
print('Input was restored:', x.storage().size() != 0)
'''


def test_seed_readme_example_runs_unchanged():
    """The seed README's example, import names changed, runs; the caller's x is never freed (see module docs)."""
    out = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(out), pytest.warns(UserWarning, match="TypedStorage"):
        exec(SEED_EXAMPLE + SEED_USAGE, namespace)  # noqa: S102 - our own example
    assert out.getvalue().splitlines() == [
        "Consistent strict: True",
        "Is invertible: True",
        "Output requires_grad: True",
        "Input was freed: False",
        "Input was restored: True",
    ]


def seed_linear(width=4, out=None):
    namespace = {}
    exec(SEED_EXAMPLE, namespace)  # noqa: S102
    torch.manual_seed(0)
    module = namespace["InvertibleLinear"](width, out or width).double()
    with torch.no_grad():
        module.weight.add_(3 * torch.eye(width, dtype=DT))
    return module


class Coupling(inn.Module):
    """y1 = x1 + F(x2), y2 = x2, with dropout inside F; reversible (inverse and function swap)."""

    def __init__(self, width, dropout=0.0):
        super().__init__()
        self.F = nn.Sequential(nn.Linear(width, width, dtype=DT), nn.Tanh(), nn.Dropout(dropout))

    def function(self, x1, x2, strict=None, saved=()):
        return x1 + self.F(x2), x2

    def inverse(self, y1, y2, saved=(), strict=None):
        return y1 - self.F(y2), y2

    @property
    def reversible(self):
        return True


class WithStatistics(inn.Module):
    """y = (x - mean) * 2, with the batch mean as an extra output only the inverse needs."""

    num_function_outputs = -1

    def function(self, x, strict=None):
        mean = x.mean(0, keepdim=True)
        return (x - mean) * 2, mean

    def inverse(self, y, mean, saved=()):
        return y / 2 + mean


def train_step(model, inputs_fn, loss_fn=lambda out: sum(o.pow(2).sum() for o in out)):
    torch.manual_seed(11)
    inputs, leaves = inputs_fn()
    zero(model.parameters())
    out = model(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    loss_fn(out).backward()
    return [o.detach() for o in out], grads_of(leaves), grads_of(model.parameters())


def plain_and_modes(model, inputs_fn, **tolerance):
    with inn.mode(model, checkpoint=False):
        expected = train_step(model, inputs_fn)
    for flags in ({"invertible": False}, {"invertible": True}):
        with inn.mode(model, **flags):
            assert_close(train_step(model, inputs_fn), expected, what=str(flags), **tolerance)


def test_seed_linear_in_every_mode_matches_plain():
    model = seed_linear()

    def inputs():
        x = torch.randn(6, 4, dtype=DT, requires_grad=True)
        return (x * 1,), [x]

    plain_and_modes(model, inputs, rtol=1e-9, atol=1e-10)


def test_coupling_with_dropout_in_every_mode_matches_plain():
    model = Coupling(5, dropout=0.4)

    def inputs():
        a, b = torch.randn(4, 5, dtype=DT, requires_grad=True), torch.randn(4, 5, dtype=DT, requires_grad=True)
        return (a * 1, b * 1), [a, b]

    plain_and_modes(model, inputs)


def test_flags_follow_the_invtorch_rules():
    m = seed_linear()
    assert (m.checkpoint, m.invertible, m.seed, m.reversed) == (True, True, True, False)
    m.invertible = False
    assert m.checkpoint and not m.invertible
    m.checkpoint = False
    assert not m.checkpoint and not m.invertible
    m.invertible = True
    assert m.checkpoint and m.invertible
    m.checkpoint = False
    m.checkpoint = True
    assert not m.invertible  # checkpoint=False cleared it
    assert "checkpoint=True" in repr(m)


def test_flags_settable_any_time_and_noops_without_grad():
    model = seed_linear()
    x = torch.randn(3, 4, dtype=DT)
    with torch.no_grad():
        y = model(x)
    assert y.grad_fn is None
    for flags in ({"checkpoint": False}, {"invertible": False}, {"seed": False}, {"invertible": True}):
        with inn.mode(model, **flags):
            y = model(x)
            assert y.requires_grad


def test_reverse_swaps_function_and_inverse():
    m = Coupling(3)
    a, b = torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT)
    y1, y2 = m(a, b)
    m.reverse()
    assert m.reversed and m.call_function == m.inverse and m.call_inverse == m.function
    x1, x2 = m(y1, y2)
    assert_close((x1, x2), (a, b))
    m.reversed = False
    assert not m.reversed
    with pytest.raises(invfx.InvfxError, match="not reversible"):
        seed_linear().reverse()


def test_reversed_module_trains_like_its_plain_inverse():
    model = Coupling(4).reverse()

    def inputs():
        a, b = torch.randn(3, 4, dtype=DT, requires_grad=True), torch.randn(3, 4, dtype=DT, requires_grad=True)
        return (a * 1, b * 1), [a, b]

    plain_and_modes(model, inputs)


def test_extra_outputs_kept_for_the_inverse_but_not_returned():
    m = WithStatistics()
    assert m.num_outputs == -1
    x = torch.randn(5, 3, dtype=DT, requires_grad=True)
    h = x * 1
    with inn.free(h):
        y = m(h)
    assert isinstance(y, torch.Tensor) and is_freed(h)
    y.pow(2).sum().backward()
    got = x.grad.clone()
    x.grad = None
    ((x - x.mean(0, keepdim=True)) * 2).pow(2).sum().backward()
    assert_close(got, x.grad)
    assert m.process_outputs(1, 2, 3) == (1, 2)


def test_check_function_reports_whether_strict_is_honoured():
    class IgnoresStrict(inn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=DT))

        def function(self, x, strict=None):
            return x * self.w

        def inverse(self, y, saved=()):
            return y / self.w

    x = torch.randn(2, 3, dtype=DT)
    assert seed_linear(3).check_function(x)
    assert not IgnoresStrict().check_function(x)


def test_outputs_needing_grad_discovered_when_strict_is_ignored():
    """function ignores strict; the runtime still marks exactly the outputs that need grad."""

    class TwoOutputs(inn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=DT))

        def function(self, x, c, strict=None):
            return x * self.w, c * 2

        def inverse(self, y, d, saved=()):
            return y / self.w, d / 2

    m = TwoOutputs()
    y, d = m(torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT))
    assert y.requires_grad and not d.requires_grad
    y.sum().backward()
    assert m.w.grad is not None


def test_check_inverse():
    x = torch.randn(6, 4, dtype=DT)
    assert seed_linear().check_inverse(x)

    class Wrong(inn.Module):
        def function(self, x, strict=None):
            return x * 2

        def inverse(self, y, saved=()):
            return y / 3

    assert not Wrong().check_inverse(x)


def test_requires_grad_utility():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2)
    assert requires_grad(a) and not requires_grad(b) and not requires_grad(None)
    out = torch.zeros(2)
    assert requires_grad(out, any=(b, a)) and out.requires_grad
    out = torch.zeros(2)
    assert not requires_grad(out, any=(b,)) and not out.requires_grad
    assert not requires_grad(any=(a,), all=(a, b))
    assert requires_grad(any=[[b], (a,)], all=(a,))


def test_mode_context_manager_sets_and_restores_a_tree():
    chain = inn.InvertibleSequential(seed_linear(), Coupling(4), nn.Identity())
    before = [(m.checkpoint, m.invertible, m.seed) for m in chain if isinstance(m, inn.Module)]
    with inn.mode(chain, invertible=False, seed=False):
        assert all(m.checkpoint and not m.invertible and not m.seed for m in chain if isinstance(m, inn.Module))
    assert [(m.checkpoint, m.invertible, m.seed) for m in chain if isinstance(m, inn.Module)] == before
    with pytest.raises(invfx.InvfxError, match="unknown"):
        with inn.mode(chain, fast=True):
            pass
    with chain[0].temp_mode(checkpoint=False):
        assert not chain[0].checkpoint and chain[1].checkpoint
    assert chain[0].invertible


def test_lone_module_never_frees_the_callers_tensors():
    """x + block(x): InvTorch and memcnn segfault. A lone call frees nothing it cannot prove dead."""
    block = seed_linear()
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    h = x * 1
    out = h + block(h)
    assert not is_freed(h)
    out.sum().backward()
    got = x.grad.clone()
    x.grad = None
    with block.temp_mode(checkpoint=False):
        (x * 1 + block(x * 1)).sum().backward()
    assert_close(got, x.grad)


def test_sequential_frees_links_only_and_matches_plain(monkeypatch):
    # observe the links with hooks, telling the container to free them anyway (we only look at their storage)
    monkeypatch.setattr(inn.container, "_hooked", lambda module: False)
    blocks = [Coupling(4, dropout=0.3) for _ in range(8)]
    chain = inn.InvertibleSequential(*blocks)
    outputs = []
    for block in blocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    a, b = torch.randn(3, 4, dtype=DT), torch.randn(3, 4, dtype=DT, requires_grad=True)
    y1, y2 = chain(a, b)
    assert not is_freed(a) and not is_freed(b)
    # every link's first stream is freed (the second passes through unchanged: a view, never freed)
    assert all(is_freed(o[0]) for o in outputs[:-1]) and not is_freed(outputs[-1][0])

    def inputs():
        a, b = torch.randn(3, 4, dtype=DT, requires_grad=True), torch.randn(3, 4, dtype=DT, requires_grad=True)
        return (a * 1, b * 1), [a, b]

    plain_and_modes(chain, inputs)


def test_sequential_inverse_and_whole_chain_region():
    chain = inn.InvertibleSequential(*[seed_linear() for _ in range(3)])
    x = torch.randn(5, 4, dtype=DT)
    assert chain.check_inverse(x)
    expected = chain(x)
    chain.invertible = True  # one invertible region for the whole chain
    assert chain.checkpoint

    def inputs():
        x = torch.randn(5, 4, dtype=DT, requires_grad=True)
        return (x * 1,), [x]

    with inn.mode(chain, checkpoint=False):
        reference = train_step(chain, inputs)
    assert_close(train_step(chain, inputs), reference, rtol=1e-9, atol=1e-10)
    assert_close(chain(x).detach(), expected.detach())



def test_sequential_keeps_outputs_that_hooks_can_see():
    """A forward hook may keep a block's output (feature extraction): that link is not freed."""
    blocks = [seed_linear() for _ in range(4)]
    chain = inn.InvertibleSequential(*blocks)
    seen = []
    blocks[1].register_forward_hook(lambda module, args, out: seen.append((out, out.detach().clone())))
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    y = chain(x)
    (out, value), = seen
    assert not is_freed(out)
    del y
    assert_close(out.detach(), value)

