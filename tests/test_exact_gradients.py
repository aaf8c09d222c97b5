"""Silent wrong gradients found by the flow generator (issue 14), each as a small model in float64 against plain
autograd with every mode set; grad mode inside a model's forward; the errors that must name what to do."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import invfx

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)
MODE_SETS = [("keep", "checkpoint", "invertible"), ("invertible",), ("checkpoint",), ("keep",)]
W = 8


def step(model, x, *args, seed=3):
    """Outputs, the input's gradient and every parameter's gradient (None where it has none)."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    out = model(x, *args)
    outs = out if isinstance(out, tuple) else (out,)
    weights = torch.Generator().manual_seed(0)
    sum((o * torch.randn(o.shape, generator=weights, dtype=o.dtype)).sum() for o in outs).backward()
    return [o.detach() for o in outs], x.grad, [p.grad for p in model.parameters()]


def against_plain(model, x, modes, *args, **optimize_args):
    expected = step(copy.deepcopy(model), x, *args)
    optimized = invfx.optimize(model, (x, *args) if args else x, modes=modes, **optimize_args)
    assert_close(step(optimized, x, *args), expected, **TOL, what=f"{type(model).__name__} {modes}")
    return optimized


def mlp(c_in, c_out):
    return nn.Sequential(nn.Linear(c_in, 2 * W), nn.Tanh(), nn.Linear(2 * W, c_out))


class SharedSideLoss(nn.Module):
    """``y1 = x1 + F(x2); y2 = x2 + G(y1)`` with a running side loss reading both sub-networks: ``l + sum(F * G)``.
    ``y1`` reads F and feeds G, so no order differentiates F and G's joined graph once: the region's backward
    recomputes the whole segment instead (before, nothing checked the order)."""

    def __init__(self):
        super().__init__()
        self.f, self.g = mlp(W // 2, W // 2), mlp(W // 2, W // 2)

    def forward(self, x1, x2, side):
        a = self.f(x2)
        y1 = x1 + a
        g = self.g(y1)
        return y1, x2 + g, side + (a * g).sum(dim=1)


class SideLossStack(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.stem = nn.Linear(W, W)
        self.blocks = nn.ModuleList(SharedSideLoss() for _ in range(depth))

    def forward(self, x):
        h = self.stem(x)
        x1, x2 = h[:, :W // 2] * 1.0, h[:, W // 2:] * 1.0
        side = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x1, x2, side = block(x1, x2, side)
        return torch.cat([x1, x2], 1), side


@pytest.mark.parametrize("modes", MODE_SETS)
def test_subnetworks_joined_by_a_side_loss(modes):
    optimized = against_plain(SideLossStack().to(DT), torch.randn(5, W, dtype=DT), modes)
    if modes == ("invertible",):
        unfused = [r for r in optimized.plan.rows if "recomputes the region whole" in r["why"]]
        assert unfused, optimized.plan  # the fall-back is stated in the plan
        assert "no fused backward order" in unfused[0]["why"]
        # the side loss starts at zeros: rebuilt exactly up to rounding of the outputs, it is not refused (it was
        # "off by 3e+20" relative to its own zeros)
        assert not any("not invertible here" in r["why"] for r in optimized.plan.rows), optimized.plan


class ChunkItemRead(nn.Module):
    """An affine coupling behind flips whose ``chunk`` the rebuild recomputes for one item while the forward
    reads the other item outside the sub-network: the gradient of that item was dropped (the sub-network's
    backward took only tensor outputs as roots, and a chunk makes a tuple)."""

    def __init__(self):
        super().__init__()
        self.f = mlp(W // 2, W)
        self.head = nn.Linear(W, W)

    def forward(self, x):
        a = x.flip(1)
        b = a.flip(1)
        c = b.flip(1)
        x1, x2 = c.chunk(2, dim=1)
        s, t = self.f(x2).chunk(2, dim=1)
        y = torch.cat([torch.exp(torch.tanh(s)) * x1 + t, x2], 1)
        return self.head(y) + 0.5 * a + 0.5 * b, torch.tanh(s).sum(1)


@pytest.mark.parametrize("modes", MODE_SETS)
def test_an_item_of_a_recomputed_chunk_read_outside_the_subnetwork(modes):
    against_plain(ChunkItemRead().to(DT), torch.randn(3, W, dtype=DT), modes)


class SlicedHalves(nn.Module):
    """A coupling that halves its input by slicing (``x[:, :4]``): the backward took tensor indexing for a tuple
    item and raised ``TypeError: unhashable type: 'slice'``."""

    def __init__(self):
        super().__init__()
        self.f, self.g = mlp(W // 2, W // 2), mlp(W // 2, W // 2)

    def forward(self, x):
        for _ in range(2):
            x1, x2 = x[:, :W // 2], x[:, W // 2:]
            y1 = x1 + self.f(x2)
            x = torch.cat([x2 + self.g(y1), y1], 1) * 1.5
        return x


@pytest.mark.parametrize("modes", MODE_SETS)
def test_halves_taken_by_slicing(modes):
    against_plain(SlicedHalves().to(DT), torch.randn(3, W, dtype=DT), modes)


# -- grad mode inside the model ---------------------------------------------------------------------------------


class Coupling(nn.Module):
    def __init__(self, frozen_inside):
        super().__init__()
        self.f, self.g = mlp(W // 2, W // 2), mlp(W // 2, W // 2)
        self.frozen_inside = frozen_inside

    def sub(self, u):
        h = self.f[1](self.f[0](u))
        if self.frozen_inside:  # part of the sub-network F under no_grad
            with torch.no_grad():
                h = h * torch.sigmoid(h)
        return self.f[2](h)

    def forward(self, x):
        a, b = x.chunk(2, 1)
        a = a + self.sub(b)
        b = b + self.g(a)
        return torch.cat([a, b], 1)


class GradModes(nn.Module):
    """Couplings, with ``torch.no_grad`` around part of the forward (``outer``) and inside a sub-network
    (``inner``), ``enable_grad`` inside a no_grad block, and ``set_grad_enabled`` as a plain call."""

    def __init__(self, outer, inner, how="no_grad"):
        super().__init__()
        self.stem, self.side, self.head = nn.Linear(W, W), nn.Linear(W, W), nn.Linear(W, 3)
        self.blocks = nn.ModuleList(Coupling(inner) for _ in range(3))
        self.outer, self.how = outer, how

    def forward(self, x):
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if self.outer and i == 1:
                if self.how == "no_grad":
                    with torch.no_grad():
                        scale = self.side(h).abs().mean() + 1
                elif self.how == "enable_grad_inside":
                    with torch.no_grad():
                        with torch.enable_grad():
                            h = h * torch.sigmoid(self.side(h))
                        scale = self.side(h).abs().mean() + 1
                elif self.how == "set_grad_enabled":
                    with torch.set_grad_enabled(False):
                        scale = self.side(h).abs().mean() + 1
                else:  # decorator form
                    scale = self.frozen_scale(h)
                h = h / scale
        return self.head(h)

    @torch.no_grad()
    def frozen_scale(self, h):
        return self.side(h).abs().mean() + 1


@pytest.mark.parametrize("modes", MODE_SETS)
@pytest.mark.parametrize("outer,inner,how", [(True, False, "no_grad"), (False, True, "no_grad"),
                                             (True, True, "no_grad"), (True, False, "enable_grad_inside"),
                                             (True, False, "set_grad_enabled"), (True, False, "decorator")])
def test_grad_mode_inside_the_forward(outer, inner, how, modes):
    """fx traces through ``with torch.no_grad()`` and records nothing: the optimized module gave gradients to
    parameters that plain autograd gives none (and the input gradient differed). The switches are graph
    calls now, never inside a region."""
    model = GradModes(outer, inner, how).to(DT)
    optimized = against_plain(model, torch.randn(4, W, dtype=DT), modes)
    assert "enter_grad_mode" in optimized.code


def test_grad_mode_switches_restore_the_callers_mode():
    """Leaving a recorded ``no_grad`` puts back the caller's mode, not the one seen when tracing."""
    model = GradModes(True, True).to(DT)
    optimized = invfx.optimize(model, torch.randn(4, W, dtype=DT))
    with torch.no_grad():
        out = optimized(torch.randn(4, W, dtype=DT))
    assert not out.requires_grad
    assert torch.is_grad_enabled()


def test_set_grad_enabled_as_a_plain_call_lasts_to_the_end_of_forward():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(W, W), nn.Linear(W, W)

        def forward(self, x):
            h = self.a(x)
            torch.set_grad_enabled(False)
            return self.b(h)

    model = Frozen().to(DT)
    optimized = invfx.optimize(model, torch.randn(2, W, dtype=DT))
    try:
        out = optimized(torch.randn(2, W, dtype=DT))
        assert not out.requires_grad and not torch.is_grad_enabled()  # as plain PyTorch leaves it
    finally:
        torch.set_grad_enabled(True)


# -- errors that say what to do ---------------------------------------------------------------------------------


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x, mask=None, scale=2.0):
        h = self.a(x)
        if mask is not None:
            h = h * mask
        return self.b(h) * scale


def test_optional_arguments_left_out_are_traced_as_their_defaults():
    model = Masked().to(DT)
    x = torch.randn(3, W, dtype=DT)
    optimized = against_plain(model, x, MODE_SETS[0])
    assert "traced with mask=None, scale=2.0" in str(optimized.plan)
    with pytest.raises(AssertionError, match="mask has been specialized to have value None"):
        optimized(x, torch.ones(3, W, dtype=DT))  # a call that gives one fails loudly, never ignores it
    mask = torch.rand(3, W, dtype=DT)
    optimized = against_plain(model, x, MODE_SETS[0], mask)  # given: traced as an input
    assert "traced with" not in str(optimized.plan).replace("traced with scale=2.0", "")


def test_a_missing_argument_without_default_is_named():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(invfx.InvfxError, match=r"TwoInputs.forward needs y, which example_inputs \(1 given\)"):
        invfx.optimize(TwoInputs(), torch.randn(2, 2))


def test_optimizing_an_optimized_module_is_refused_clearly():
    model = SlicedHalves().to(DT)
    x = torch.randn(3, W, dtype=DT)
    optimized = invfx.optimize(model, x)
    with pytest.raises(invfx.InvfxError, match="already optimized"):
        invfx.optimize(optimized, x)


def test_a_model_holding_an_optimized_module():
    """Its regions are traced as leaves and run as planned; the outer model's gradients are plain's."""
    x = torch.randn(3, W, dtype=DT)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = invfx.optimize(SlicedHalves().to(DT), x)
            self.head = nn.Linear(W, W).to(DT)

        def forward(self, x):
            return self.head(F.gelu(self.inner(x)))

    against_plain(Outer(), x, MODE_SETS[0])


# -- the last line of defence: optimize's gradient check ------------------------------------------------------


class GlowBlock(nn.Module):
    """Issue 14's block (FrEIA's GLOWCouplingBlock written out), log-det computed before the output."""

    def __init__(self, c=4, h=8):
        super().__init__()
        self.subnet1 = nn.Sequential(nn.Conv2d(c // 2, h, 3, padding=1), nn.Tanh(), nn.Conv2d(h, c, 3, padding=1))
        self.subnet2 = nn.Sequential(nn.Conv2d(c // 2, h, 3, padding=1), nn.Tanh(), nn.Conv2d(h, c, 3, padding=1))

    def coupling(self, x, u, net):
        a = net(u)
        s, t = a[:, :2], a[:, 2:]
        s = 1.2 * (0.636 * torch.atan(s))
        j = torch.sum(s, dim=(1, 2, 3))
        return torch.exp(s) * x + t, j

    def forward(self, x):
        x1, x2 = torch.split(x, [2, 2], dim=1)
        y1, j1 = self.coupling(x1, x2, self.subnet2)
        y2, j2 = self.coupling(x2, y1, self.subnet1)
        return torch.cat((y1, y2), 1), j1 + j2


class GlowStack(nn.Module):
    """``running``: the log-det summed after each block, as FrEIA's SequenceINN does (each block's segment then
    takes in the sum's add and rebuilds the running sum too); else the blocks' log-dets summed at the end."""

    def __init__(self, depth=3, running=True):
        super().__init__()
        self.blocks = nn.ModuleList(GlowBlock() for _ in range(depth))
        self.running = running

    def forward(self, x):
        logdet, logdets = 0, []
        for block in self.blocks:
            x, j = block(x)
            if self.running:
                logdet = j + logdet
            else:
                logdets.append(j)
        return x, (logdet if self.running else torch.stack(logdets).sum(0))


def _reversed_forward_order(self, nodes):
    """The fused backward's order before issue 14's fix: each sub-network where its last node stands."""
    from invfx.regions import fused as fuse

    units, seen = [], set()
    for node in reversed(nodes[:-1]):
        component = self.component_of.get(fuse._value(node))
        if component is not None:
            if id(component) not in seen:
                seen.add(id(component))
                units.append(component)
        elif node.op not in ("placeholder", "get_attr") and not fuse.is_rng_mark(self.forward_body, node):
            units.append(node)
    return units


def test_the_gradient_check_refuses_a_plan_that_trains_wrong(monkeypatch):
    """With issue 14's bug put back, optimize refuses the plan and names the regions that give the difference,
    even for a float32 model (the check runs on a float64 copy). (Each block's log-det read after it, as issue 14
    had it: a running sum makes the blocks rebuild theirs, which puts it inside the sub-network's graph.)"""
    from invfx.regions.fused import FusedReplay

    model = GlowStack(running=False)
    x = torch.randn(2, 4, 8, 8)
    monkeypatch.setattr(FusedReplay, "_backward_order", _reversed_forward_order)
    with pytest.raises(invfx.GradientCheckError, match=r"\(float64 copy\): gradient of blocks\.\d\..* off by .* "
                                                       r"comes from inv_blocks_\d"):
        invfx.optimize(model, x)
    optimized = invfx.optimize(model, x, check_gradients=False)  # the opt-out
    assert optimized.plan.gradient_check is None


def test_the_gradient_check_is_reported_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(W, W), nn.BatchNorm1d(W), GradModes(True, True)).float()
    x = torch.randn(6, W)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    optimized = invfx.optimize(model, x)
    check = optimized.plan.gradient_check
    assert check.dtype == torch.float64 and check.worst <= 1e-9 and check.compared > 20
    assert "gradient check: one training step" in str(optimized.plan)
    assert optimized.plan.to_dict()["gradient_check"]["dtype"] == "float64"
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.dtype == torch.float32 for p in model.parameters())


class AutocastInside(nn.Module):
    """``torch.autocast`` entered inside the forward: fx ran it at trace time and recorded nothing (the optimized
    module computed in float32 where the model computed in bfloat16)."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(W, W), nn.Linear(W, 3)
        self.blocks = nn.ModuleList(Coupling(False) for _ in range(2))

    def forward(self, x):
        h = self.stem(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.blocks[0](h)
        h = self.blocks[1](h.float())
        return self.head(h)


@pytest.mark.parametrize("modes", MODE_SETS)
def test_autocast_inside_the_forward(modes):
    model = AutocastInside()
    x = torch.randn(4, W)
    expected = step(copy.deepcopy(model), x)
    optimized = invfx.optimize(model, x, modes=modes)
    assert "_enter_autocast" in optimized.code
    got = step(optimized, x)
    # (bfloat16 inside: the same ops in the same dtype, an inverse's rounding aside)
    assert_close(got, expected, rtol=2e-2, atol=1e-2, what=f"autocast {modes}")
