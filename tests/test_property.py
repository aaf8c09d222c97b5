"""Property-based: random plainly written models built from invertible pieces and non-invertible ones give
plain autograd's outputs and gradients after invfx.optimize, at the example's batch size and another."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import invfx

DT = torch.float64
WIDTH = 8


class Piece(nn.Module):
    """One step of a random model, chosen by ``kind``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        half = WIDTH // 2
        if kind == "bn_coupling":
            self.f = nn.Sequential(nn.Linear(half, half), nn.BatchNorm1d(half), nn.Tanh())
        if kind in ("additive", "affine", "sliced", "two_nets", "dropout_coupling", "residual"):
            self.f = nn.Sequential(nn.Linear(half if kind != "residual" else WIDTH, WIDTH),
                                   nn.Tanh(), nn.Dropout(0.3 if kind == "dropout_coupling" else 0.0),
                                   nn.Linear(WIDTH, WIDTH if kind in ("affine", "residual") else half))
        if kind == "two_nets":
            self.g = nn.Sequential(nn.Linear(half, half), nn.GELU())
        if kind == "linear":
            self.linear = nn.Linear(WIDTH, WIDTH)
            with torch.no_grad():
                self.linear.weight.add_(3 * torch.eye(WIDTH))

    def forward(self, x):
        kind = self.kind
        if kind == "additive":
            a, b = x.chunk(2, dim=1)
            return torch.cat([b, a + self.f(b)], dim=1)
        if kind == "two_nets":
            a, b = x.chunk(2, dim=1)
            a = a + self.f(b)
            b = b + self.g(a)
            return torch.cat([a, b], dim=1)
        if kind == "dropout_coupling":
            a, b = x.chunk(2, dim=1)
            return torch.cat([a + self.f(b), b], dim=1)
        if kind == "affine":
            a, b = x.chunk(2, dim=1)
            s, t = self.f(b).chunk(2, dim=1)
            return torch.cat([a * torch.sigmoid(s + 2.0) + t, b], dim=1)
        if kind == "sliced":
            a, b = x[:, :WIDTH // 2], x[:, WIDTH // 2:]
            return torch.cat([b, a + self.f(b)], dim=1)
        if kind == "leaky":
            return F.leaky_relu(x, 0.2) * 1.5
        if kind == "linear":
            return self.linear(x)
        if kind == "flip":
            return x.flip(1) - 0.5
        if kind == "reshape":
            return x.reshape(x.shape[0], 2, WIDTH // 2).transpose(1, 2).reshape(x.shape[0], -1) * 2
        if kind == "residual":  # x is read after f: never freed
            return x + self.f(x)
        if kind == "relu":
            return torch.relu(x) + 0.1
        if kind == "bn_coupling":
            a, b = x.chunk(2, dim=1)
            return torch.cat([a + self.f(b), b], dim=1)
        if kind == "identity":
            return x
        if kind == "inplace":
            return (x * 1.5).add_(1.0)
        if kind == "inplace_input":  # writes into its own input, which an earlier piece made
            y = x.mul_(2.0)
            return F.relu(y, inplace=True) + 0.5
        if kind == "exp":
            return torch.exp(x * 0.1)
        raise AssertionError(kind)


KINDS = ["additive", "two_nets", "dropout_coupling", "affine", "sliced", "leaky", "linear", "flip", "reshape",
         "residual", "relu", "bn_coupling", "identity", "inplace", "inplace_input", "exp"]


class RandomModel(nn.Module):
    def __init__(self, kinds):
        super().__init__()
        self.stem = nn.Linear(WIDTH, WIDTH)
        self.pieces = nn.ModuleList([Piece(k) for k in kinds])
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        h = self.stem(x) * 1.0
        for piece in self.pieces:
            h = piece(h)
        return self.head(h)


def step(model, x, params):
    params = list(model.parameters()) if params is None else params
    torch.manual_seed(7)
    for p in params:
        p.grad = None
    x = x.detach().clone().requires_grad_()
    out = model(x)
    (out.pow(2).mean() + out.sum()).backward()
    return out.detach(), x.grad, [p.grad for p in params]


# derandomized: CI sees the same 25 models every run; INVFX_PROPERTY_EXAMPLES=1500 (random) for a long sweep
EXAMPLES = int(os.environ.get("INVFX_PROPERTY_EXAMPLES", "0"))


@pytest.mark.slow
@settings(max_examples=EXAMPLES or 25, deadline=None, derandomize=not EXAMPLES, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       batch=st.sampled_from([3, 5]))
def test_random_models_give_plain_gradients(kinds, seed, batch):
    torch.manual_seed(seed)
    model = RandomModel(kinds).to(DT)
    twin = copy.deepcopy(model)
    params, twin_params = list(model.parameters()), list(twin.parameters())
    x = torch.randn(batch, WIDTH, dtype=DT)
    try:
        step(copy.deepcopy(model), x, None)
    except RuntimeError:
        return  # not a valid plain model (an in-place op on a value autograd saved): nothing to compare
    optimized = invfx.optimize(model, x)
    for data in (x, torch.randn(batch + 2, WIDTH, dtype=DT)):
        expected = step(twin, data, twin_params)
        try:
            got = step(optimized, data, params)
        except invfx.InverseError:
            # allowed only for data unlike the example (a tanh saturating on it): a loud error, never silence
            assert data is not x
            continue
        assert_close(got, expected, rtol=1e-7, atol=1e-9, what=f"{kinds}")
    for ours, theirs in zip(model.buffers(), twin.buffers()):  # BatchNorm statistics: one update per step
        assert_close(ours, theirs, rtol=1e-9, atol=1e-12, what=f"{kinds} buffers")


@pytest.mark.parametrize("kinds", [KINDS, ["additive"] * 6, ["two_nets", "dropout_coupling"] * 3])
def test_every_piece_together(kinds):
    torch.manual_seed(0)
    model = RandomModel(kinds).to(DT)
    params = list(model.parameters())
    x = torch.randn(4, WIDTH, dtype=DT)
    optimized = invfx.optimize(model, x)
    assert any(r["mode"] == "invertible" for r in optimized.plan.rows)
    assert_close(step(optimized, x, params), step(model, x, params), rtol=1e-7, atol=1e-9)
