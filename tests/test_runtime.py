"""The region runtime against plain autograd: outputs, every gradient, freeing and restoring."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, grads_of, zero
from torch import nn

import invfx
from invfx.runtime import Region, ReplayContext, run_region
from invfx.runtime.storage import is_freed

DT = torch.float64


class LeakyLinear(nn.Module):
    """y = leaky_relu(x W^T + b): square, invertible."""

    def __init__(self, width, slope=0.2):
        super().__init__()
        self.linear = nn.Linear(width, width, dtype=DT)
        with torch.no_grad():
            self.linear.weight.add_(3 * torch.eye(width, dtype=DT))  # well conditioned
        self.slope = slope

    def forward(self, x):
        return F.leaky_relu(self.linear(x), self.slope)

    def inverse(self, y):
        z = F.leaky_relu(y, 1 / self.slope)
        return torch.linalg.solve(self.linear.weight, (z - self.linear.bias).T).T


class Coupling(nn.Module):
    """Two streams: y1 = x1 + F(x2), y2 = x2 * exp(s(y1)) + t(y1); F may hold dropout or BatchNorm."""

    def __init__(self, width, dropout=0.0, batchnorm=False):
        super().__init__()
        layers = [nn.Linear(width, width, dtype=DT)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(width, dtype=DT))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, width, dtype=DT)]
        self.F = nn.Sequential(*layers)
        self.s = nn.Linear(width, width, dtype=DT)
        self.t = nn.Linear(width, width, dtype=DT)

    def forward(self, x1, x2):
        y1 = x1 + self.F(x2)
        y2 = x2 * torch.exp(torch.tanh(self.s(y1))) + self.t(y1)
        return y1, y2

    def inverse(self, y1, y2):
        x2 = (y2 - self.t(y1)) * torch.exp(-torch.tanh(self.s(y1)))
        x1 = y1 - self.F(x2)
        return x1, x2


def params(module):
    return list(module.parameters())


def run_both(module, make_inputs, region_call, backward=lambda outs: sum(o.sum() for o in outs)):
    """Plain step then region step on the same weights and inputs; returns both (outputs, grads)."""
    results = []
    for use_region in (False, True):
        torch.manual_seed(1)
        inputs, leaves = make_inputs()
        zero(params(module))
        outs = region_call(module, *inputs) if use_region else module(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        backward(outs).backward()
        results.append(([o.detach() for o in outs], grads_of(leaves), grads_of(params(module))))
    return results


def invertible(module, *args, free=True):
    return invfx.invertible_checkpoint(module, module.inverse, *args, free=free, buffers=[module])


def checkpointed(module, *args):
    return invfx.checkpoint(module, *args, buffers=[module])


@pytest.mark.parametrize("call", [checkpointed, invertible], ids=["checkpoint", "invertible"])
def test_two_stream_coupling_matches_plain(call):
    block = Coupling(6)

    def inputs():
        x = torch.randn(5, 12, dtype=DT, requires_grad=True)
        a, b = (x * 1.5).chunk(2, dim=1)
        return (a.contiguous(), b.contiguous()), [x]

    plain, ours = run_both(block, inputs, call)
    assert_close(ours, plain, what="outputs/grads")


def test_intermediate_inputs_freed_until_backward_then_restored():
    block = LeakyLinear(8)
    x = torch.randn(4, 8, dtype=DT, requires_grad=True)
    h = x * 2  # an intermediate: nobody else reads it
    expected = h.detach().clone()
    version = h._version
    y = invfx.invertible_checkpoint(block, block.inverse, h, free=[0])
    assert is_freed(h) and h.untyped_storage().nbytes() == 0
    y.sum().backward()
    assert h.untyped_storage().nbytes() == expected.numel() * 8
    assert_close(h.detach(), expected, rtol=1e-9, atol=1e-9)
    assert h._version == version  # restored without a version bump


def test_checkpoint_and_free_list_respected():
    block = LeakyLinear(4)
    h = torch.randn(3, 4, dtype=DT, requires_grad=True) * 1
    invfx.invertible_checkpoint(block, block.inverse, h, free=()).sum().backward()
    assert not is_freed(h)
    with pytest.raises(invfx.RegionError, match="free and keep are for invertible"):
        run_region(Region(block, "checkpoint", free=frozenset({0})), (h,))


class AdditiveCoupling(nn.Module):
    """y = cat(x1 + F(x2), x2). Its inverse gives back exact zeros ((0 + f) - f == 0 in IEEE arithmetic)."""

    def __init__(self, width):
        super().__init__()
        self.F = nn.Sequential(nn.Linear(width // 2, width // 2, dtype=DT), nn.Tanh())

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 + self.F(x2), x2], dim=-1)

    def inverse(self, y):
        y1, y2 = y.chunk(2, dim=-1)
        return torch.cat([y1 - self.F(y2), y2], dim=-1)


def test_relu_before_region_still_backprops():
    """The producer saved its output (relu) and the region frees it: the restore must not bump the version,
    and relu's backward must see its zeros. (It reads the *rebuilt* values: an inverse that is exact only up to
    rounding, like a solve, can turn a 0 into 1e-16 and open relu's mask; couplings rebuild zeros exactly.)"""
    lin = nn.Linear(6, 6, dtype=DT)
    block = AdditiveCoupling(6)
    modules = nn.ModuleList([lin, block])

    def inputs():
        return (torch.randn(3, 6, dtype=DT, requires_grad=True),)

    def model(m, x, region):
        r = torch.relu(lin(x))
        if not region:
            return block(r)
        y = invfx.invertible_checkpoint(block, block.inverse, r, free=[0])
        assert is_freed(r)
        return y

    outs = []
    for region in (False, True):
        torch.manual_seed(3)
        (x,) = inputs()
        zero(params(modules))
        y = model(modules, x, region)
        y.pow(2).sum().backward()
        outs.append((y.detach(), x.grad, grads_of(params(modules))))
    assert_close(outs[1], outs[0])


def test_multiple_inputs_outputs_and_non_tensors():
    w = nn.Parameter(torch.randn(4, 4, dtype=DT))

    def f(a, scale, b):
        return a @ w * scale, "tag", b + a, 7

    def f_inverse(y1, tag, y2, seven):
        a = y1 / 2.0 @ torch.linalg.inv(w)
        return a, 2.0, y2 - a

    results = []
    for region in (False, True):
        torch.manual_seed(0)
        a0 = torch.randn(3, 4, dtype=DT, requires_grad=True)
        b0 = torch.randn(3, 4, dtype=DT, requires_grad=True)
        a, b = a0 * 1, b0 * 1
        w.grad = None
        out = invfx.invertible_checkpoint(f, f_inverse, a, 2.0, b, free=True) if region else f(a, 2.0, b)
        assert out[1] == "tag" and out[3] == 7
        if region:
            assert is_freed(a) and is_freed(b)
        (out[0].sum() + (out[2] ** 2).sum()).backward()
        results.append((out[0].detach(), out[2].detach(), a0.grad, b0.grad, w.grad))
    assert_close(results[1], results[0])


def test_parameters_get_grads_when_no_input_requires_grad():
    for call in (checkpointed, invertible):
        block = LeakyLinear(5)
        x = torch.randn(4, 5, dtype=DT)
        y = call(block, x)
        assert y.requires_grad
        y.sum().backward()
        got = grads_of(params(block))
        zero(params(block))
        block(x).sum().backward()
        assert_close(got, grads_of(params(block)))


@pytest.mark.parametrize("call", [checkpointed, invertible], ids=["checkpoint", "invertible"])
def test_leaf_input_gradient_not_doubled(call):
    block = LeakyLinear(5)
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    call(block, x).sum().backward()  # invertible frees x (free=True) and restores it
    got = x.grad.clone()
    x.grad = None
    block(x).sum().backward()
    assert_close(got, x.grad)


@pytest.mark.parametrize("call", [checkpointed, invertible], ids=["checkpoint", "invertible"])
def test_autograd_grad_and_backward_inputs(call):
    block = LeakyLinear(5)
    weight = block.linear.weight
    x0 = torch.randn(4, 5, dtype=DT, requires_grad=True)

    expected = torch.autograd.grad(block(x0 * 1).pow(2).sum(), [x0, weight])
    got = torch.autograd.grad(call(block, x0 * 1).pow(2).sum(), [x0, weight])
    assert_close(got, expected)
    assert weight.grad is None and x0.grad is None  # autograd.grad accumulates nothing

    call(block, x0 * 1).pow(2).sum().backward(inputs=[weight])
    assert_close(weight.grad, expected[1])
    assert x0.grad is None and block.linear.bias.grad is None


@pytest.mark.parametrize("call", [checkpointed, invertible], ids=["checkpoint", "invertible"])
def test_second_backward_with_retain_graph(call):
    block = LeakyLinear(5)
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    y = call(block, x * 1)
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    got = x.grad.clone(), grads_of(params(block))
    x.grad = None
    zero(params(block))
    z = block(x * 1)
    z.sum().backward(retain_graph=True)
    z.sum().backward()
    assert_close(got, (x.grad, grads_of(params(block))))


def test_second_backward_without_retain_graph_raises_clearly():
    block = LeakyLinear(5)
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    y = invertible(block, x * 1)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()


def test_double_backward_refused():
    block = LeakyLinear(5)
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    with pytest.raises(invfx.RegionError, match="double backward"):
        torch.autograd.grad(invertible(block, x * 1).sum(), x, create_graph=True)


@pytest.mark.parametrize("call", [checkpointed, invertible], ids=["checkpoint", "invertible"])
def test_dropout_gradients_equal_plain(call):
    block = Coupling(6, dropout=0.5)

    def inputs():
        x = torch.randn(8, 12, dtype=DT, requires_grad=True)
        a, b = (x * 1).chunk(2, dim=1)
        return (a.contiguous(), b.contiguous()), [x]

    plain, ours = run_both(block, inputs, call)
    assert_close(ours, plain)


def test_rng_streams_untouched_by_backward():
    block = Coupling(4, dropout=0.3)
    after = []
    for region in (False, True):
        torch.manual_seed(5)
        a, b = torch.randn(3, 4, dtype=DT), torch.randn(3, 4, dtype=DT, requires_grad=True)
        out = invertible(block, a, b * 1) if region else block(a, b * 1)
        sum(o.sum() for o in out).backward()
        after.append(torch.rand(3))
    assert_close(after[1], after[0])


@pytest.mark.parametrize("call", [checkpointed, invertible], ids=["checkpoint", "invertible"])
def test_cpu_bf16_autocast_matches_plain_autocast(call):
    block = Coupling(8).float()
    block.F[0].weight.data.mul_(0.3)

    def step(region):
        torch.manual_seed(2)
        x = torch.randn(6, 16, requires_grad=True)
        a, b = (x * 1).chunk(2, dim=1)
        zero(params(block))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(block, a.contiguous(), b.contiguous()) if region else block(a.contiguous(), b.contiguous())
            assert block.F[0](a).dtype == torch.bfloat16
        sum(o.float().pow(2).sum() for o in out).backward()
        return [o.detach() for o in out], x.grad, grads_of(params(block))

    plain, ours = step(False), step(True)
    assert_close(ours, plain, rtol=2e-2, atol=2e-2)  # bf16: the inverse rebuilds to bf16 precision
    for got, expected in zip(ours[2], plain[2]):
        assert got.dtype == expected.dtype == torch.float32


@pytest.mark.parametrize("call", [checkpointed, invertible], ids=["checkpoint", "invertible"])
def test_batchnorm_inside_updates_running_stats_once(call):
    block = Coupling(6, batchnorm=True)
    reference = Coupling(6, batchnorm=True)
    reference.load_state_dict(block.state_dict())

    def step(module, region):
        torch.manual_seed(4)
        x = torch.randn(10, 12, dtype=DT, requires_grad=True)
        a, b = (x * 1).chunk(2, dim=1)
        out = call(module, a.contiguous(), b.contiguous()) if region else module(a.contiguous(), b.contiguous())
        sum(o.sum() for o in out).backward()
        return [o.detach() for o in out], x.grad, grads_of(params(module))

    assert_close(step(block, True), step(reference, False))
    bn, ref_bn = block.F[1], reference.F[1]
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1
    assert_close(bn.running_mean, ref_bn.running_mean)
    assert_close(bn.running_var, ref_bn.running_var)


def test_view_of_larger_tensor_never_frees_the_base():
    block = LeakyLinear(3)
    region = Region(block, "invertible", inverse=lambda outs, saved: (block.inverse(*outs),),
                    free=frozenset({0}))
    for make_view in (lambda base: base[:, :3], lambda base: base.view(-1)[:12].view(4, 3)):
        base = torch.randn(4, 6, dtype=DT, requires_grad=True) * 1
        expected = base.detach().clone()
        y = run_region(region, (make_view(base),))
        assert not is_freed(base)
        y.sum().backward()
        assert_close(base.detach(), expected)


def test_refusals_are_recorded():
    block = LeakyLinear(3)
    calls = []
    original = invfx.runtime.region._RegionCall.release_inputs

    def spy(self, inputs):
        original(self, inputs)
        calls.append(dict(self.not_freed))

    invfx.runtime.region._RegionCall.release_inputs = spy
    try:
        base = torch.randn(4, 6, dtype=DT) * 1
        p = nn.Parameter(torch.randn(4, 3, dtype=DT))
        invfx.invertible_checkpoint(block, block.inverse, base[:, :3], free=True)
        invfx.invertible_checkpoint(lambda a, b: (block(a) + b, b), lambda y, b: (block.inverse(y - b), b),
                                    base[:, 3:].contiguous(), p, free=True)
    finally:
        invfx.runtime.region._RegionCall.release_inputs = original
    assert "view" in calls[0][0]
    assert "parameter" in calls[1][1]


def test_identity_output_is_a_view_and_protects_the_input():
    """y2 = x2 passes through: the output aliases the input, so a later region must not free it."""
    w = nn.Parameter(torch.randn(4, 4, dtype=DT))

    def f(x1, x2):
        return x1 + torch.tanh(x2 @ w), x2

    def f_inv(y1, y2):
        return y1 - torch.tanh(y2 @ w), y2

    x1 = torch.randn(3, 4, dtype=DT, requires_grad=True) * 1
    x2_leaf = torch.randn(3, 4, dtype=DT, requires_grad=True)
    x2 = x2_leaf * 1
    kept = x2.detach().clone()
    y1, y2 = invfx.invertible_checkpoint(f, f_inv, x1, x2, free=True)
    assert not is_freed(x2) and y2._is_view()
    z1, z2 = invfx.invertible_checkpoint(f, f_inv, y1, y2, free=True)
    assert not is_freed(y2) and is_freed(y1)
    assert_close(x2.detach(), kept)
    (z1.sum() + z2.sum()).backward()
    got = x2_leaf.grad.clone(), w.grad.clone()
    x2_leaf.grad = w.grad = None
    a1, a2 = f(*f(x1.detach().requires_grad_(), x2_leaf * 1))
    (a1.sum() + a2.sum()).backward()
    assert_close(got, (x2_leaf.grad, w.grad))


def test_chain_of_8_regions_frees_links_and_matches_plain():
    blocks = nn.ModuleList([LeakyLinear(6) for _ in range(8)])
    x = torch.randn(5, 6, dtype=DT, requires_grad=True)
    links = []
    h = x
    for i, block in enumerate(blocks):
        h = invfx.invertible_checkpoint(block, block.inverse, h, free=[0] if i else [])
        links.append(h)
    assert not is_freed(x)
    assert all(is_freed(link) for link in links[:-1]) and not is_freed(links[-1])
    h.pow(2).sum().backward()
    got = x.grad.clone(), grads_of(params(blocks))
    values = [link.detach().clone() for link in links]

    x.grad = None
    zero(params(blocks))
    h = x
    expected_links = []
    for block in blocks:
        h = block(h)
        expected_links.append(h.detach())
    h.pow(2).sum().backward()
    assert_close(got, (x.grad, grads_of(params(blocks))), rtol=1e-8, atol=1e-10)
    assert_close(values, expected_links, rtol=1e-8, atol=1e-10)


def test_forward_without_backward_restores_freed_inputs():
    block = LeakyLinear(5)
    x = torch.randn(4, 5, dtype=DT)
    expected = x.clone()
    y = invfx.invertible_checkpoint(block, block.inverse, x, free=[0])
    assert is_freed(x)
    gc.disable()
    try:
        del y  # reference counting alone must restore it (no cycle to wait for)
        assert not is_freed(x)
    finally:
        gc.enable()
    assert_close(x, expected, rtol=1e-9, atol=1e-9)


def test_chain_dropped_without_backward_restores_every_link():
    blocks = [LeakyLinear(4) for _ in range(6)]
    h = torch.randn(3, 4, dtype=DT, requires_grad=True)
    links = []
    for i, block in enumerate(blocks):
        h = invfx.invertible_checkpoint(block, block.inverse, h, free=[0] if i else [])
        links.append((h.detach(), h.detach().clone()))  # aliases without history: they keep no graph alive
    assert all(is_freed(alias) for alias, _ in links[:-1])
    gc.disable()
    try:
        del h
        for alias, value in links:
            assert not is_freed(alias)
            assert_close(alias, value, rtol=1e-8, atol=1e-9)
    finally:
        gc.enable()


def test_no_grad_and_eval_run_plainly():
    block = LeakyLinear(4)
    h = torch.randn(3, 4, dtype=DT, requires_grad=True) * 1
    with torch.no_grad():
        y = invfx.invertible_checkpoint(block, block.inverse, h, free=True)
    assert not is_freed(h) and y.grad_fn is None
    assert_close(y, block(h).detach())


def test_in_place_mutation_of_an_input_is_an_error():
    def bad(x):
        return x.mul_(2) if not x.requires_grad else x.clone().mul_(2)

    x = torch.randn(3, dtype=DT)
    w = nn.Parameter(torch.ones(3, dtype=DT))
    with pytest.raises(invfx.RegionError, match="in place"):
        invfx.checkpoint(lambda a: a.mul_(2) * w, x)


def test_closure_over_non_leaf_requiring_grad_is_an_error():
    outside = torch.randn(3, dtype=DT, requires_grad=True) * 2
    with pytest.raises(invfx.RegionError, match="outside the region"):
        invfx.checkpoint(lambda a: a * outside, torch.randn(3, dtype=DT))


def test_closure_parameters_found_without_being_declared():
    """A function reading weights of several modules (shared weights) gives each its gradient, once."""
    shared = nn.Linear(4, 4, dtype=DT)
    other = nn.Linear(4, 4, dtype=DT)

    def f(x):
        return shared(torch.tanh(other(shared(x))))

    x = torch.randn(2, 4, dtype=DT)
    invfx.checkpoint(f, x).sum().backward()
    got = grads_of(params(shared) + params(other))
    zero(params(shared) + params(other))
    f(x).sum().backward()
    assert_close(got, grads_of(params(shared) + params(other)))


def test_fused_replay_runs_the_subnetwork_once_in_backward():
    """A replay that rebuilds x1 = y1 - F(x2) and reuses F(x2) for the gradient: F runs twice per step."""
    net = nn.Sequential(nn.Linear(4, 4, dtype=DT), nn.Tanh())
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))

    def f(x1, x2):
        return x1 + net(x2), x2

    def fused(ctx: ReplayContext):
        y1, y2 = ctx.outputs
        x2 = ctx.input(1, y2)
        fx2 = net(x2)
        x1 = ctx.input(0, y1 - fx2.detach())
        return x1 + fx2, x2

    x1 = torch.randn(3, 4, dtype=DT, requires_grad=True)
    x2 = torch.randn(3, 4, dtype=DT, requires_grad=True)
    h1, h2 = x1 * 1, x2 * 1
    def f_inverse(outputs, saved):
        y1, y2 = outputs
        return y1 - net(y2), y2

    region = Region(f, "invertible", inverse=f_inverse, replay=fused, free=frozenset({0, 1}))
    y1, y2 = run_region(region, (h1, h2))
    assert is_freed(h1)
    (y1.pow(2).sum() + y2.pow(3).sum()).backward()
    assert len(calls) == 2
    got = x1.grad.clone(), x2.grad.clone(), grads_of(params(net))
    x1.grad = x2.grad = None
    zero(params(net))
    a, b = f(x1 * 1, x2 * 1)
    (a.pow(2).sum() + b.pow(3).sum()).backward()
    assert_close(got, (x1.grad, x2.grad, grads_of(params(net))))


def test_inverse_with_wrong_shape_is_a_clear_error():
    block = LeakyLinear(4)
    h = torch.randn(3, 4, dtype=DT, requires_grad=True) * 1
    y = invfx.invertible_checkpoint(block, lambda y: y[:, :2], h, free=True)
    with pytest.raises(invfx.InverseError, match="shape"):
        y.sum().backward()


def test_region_node_holds_no_reference_cycle():
    block = LeakyLinear(4)
    h = torch.randn(3, 4, dtype=DT, requires_grad=True) * 1
    y = invfx.invertible_checkpoint(block, block.inverse, h, free=True)
    ref = weakref.ref(y.grad_fn)
    gc.disable()
    try:
        del y
        assert ref() is None  # freed by reference counting alone
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("call", [checkpointed, invertible], ids=["checkpoint", "invertible"])
def test_cuda_dropout_and_autocast(call):
    block = Coupling(8, dropout=0.5).float().cuda()

    def step(region):
        torch.manual_seed(7)
        x = torch.randn(16, 16, device="cuda", requires_grad=True)
        a, b = (x * 1).chunk(2, dim=1)
        zero(params(block))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = call(block, a.contiguous(), b.contiguous()) if region else block(a.contiguous(), b.contiguous())
        sum(o.float().sum() for o in out).backward()
        return [o.detach() for o in out], x.grad, grads_of(params(block))

    assert_close(step(True), step(False), rtol=2e-2, atol=2e-2)


def test_wrong_inverse_is_caught_not_silently_wrong():
    block = LeakyLinear(4)
    h = torch.randn(3, 4, dtype=DT, requires_grad=True) * 1
    y = invfx.invertible_checkpoint(block, lambda y: torch.zeros_like(y), h, free=True)
    with pytest.raises(invfx.InverseError, match="relative error"):
        y.sum().backward()


def test_dropout_without_seed_is_caught_in_invertible_mode():
    block = Coupling(6, dropout=0.5)
    a, b = torch.randn(4, 6, dtype=DT), torch.randn(4, 6, dtype=DT, requires_grad=True)
    out = invfx.invertible_checkpoint(block, block.inverse, a, b * 1, free=True, preserve_rng_state=False)
    with pytest.raises(invfx.InverseError, match="not deterministic"):
        sum(o.sum() for o in out).backward()


class RevBlock(nn.Module):
    """y1 = x1 + F(x2); y2 = x2 + G(y1), both with dropout: the inverse runs G before F."""

    def __init__(self, width):
        super().__init__()
        self.F = nn.Sequential(nn.Linear(width, width, dtype=DT), nn.Dropout(0.5))
        self.G = nn.Sequential(nn.Linear(width, width, dtype=DT), nn.Dropout(0.5))

    def forward(self, x1, x2):
        invfx.runtime.rng_mark("F")
        y1 = x1 + self.F(x2)
        invfx.runtime.rng_mark("G")
        return y1, x2 + self.G(y1)

    def inverse(self, y1, y2):
        invfx.runtime.rng_mark("G")
        x2 = y2 - self.G(y1)
        invfx.runtime.rng_mark("F")
        return y1 - self.F(x2), x2


def test_rng_marks_replay_each_subnetwork_mask_when_the_inverse_reorders_them():
    block = RevBlock(6)

    def inputs():
        x = torch.randn(8, 12, dtype=DT, requires_grad=True)
        a, b = (x * 1).chunk(2, dim=1)
        return (a.contiguous(), b.contiguous()), [x]

    plain, ours = run_both(block, inputs, invertible)
    assert_close(ours, plain)


def test_rng_mark_names_are_unique_per_region():
    def twice(x):
        invfx.runtime.rng_mark("a")
        invfx.runtime.rng_mark("a")
        return torch.nn.functional.dropout(x, 0.5)

    with pytest.raises(invfx.RegionError, match="twice"):
        invfx.checkpoint(twice, torch.randn(3, dtype=DT, requires_grad=True))
    invfx.runtime.rng_mark("outside")  # a no-op outside regions


def test_kept_inputs_are_saved_and_rebuild_hook_restores_the_rest():
    """keep: an argument the rebuild reads but does not rebuild is saved; rebuild(ctx) puts back the others,
    in backward and when the graph is dropped."""
    w = nn.Parameter(torch.randn(4, 4, dtype=DT))

    def f(x, s):
        return x + torch.tanh(s @ w)

    def rebuild(ctx):
        (y,) = ctx.outputs if isinstance(ctx.outputs, tuple) else (ctx.outputs,)
        s = ctx.input(1)
        ctx.input(0, y - torch.tanh(s @ w))

    for drop in (False, True):
        x0 = torch.randn(3, 4, dtype=DT, requires_grad=True)
        s0 = torch.randn(3, 4, dtype=DT, requires_grad=True)
        x, s = x0 * 1, s0 * 1
        expected_x = x.detach().clone()
        region = Region(f, "invertible", rebuild=rebuild, free=frozenset({0}), keep=frozenset({1}))
        y = run_region(region, (x, s))
        assert is_freed(x) and not is_freed(s)
        if drop:
            del y
            assert_close(x.detach(), expected_x)
            continue
        (y * y).sum().backward()
        got = x0.grad.clone(), s0.grad.clone(), w.grad.clone()
        x0.grad = s0.grad = w.grad = None
        (f(x0 * 1, s0 * 1) ** 2).sum().backward()
        assert_close(got, (x0.grad, s0.grad, w.grad))
        w.grad = None


@pytest.mark.parametrize("call", [checkpointed, invertible], ids=["checkpoint", "invertible"])
def test_parameter_hooks_fire_once(call):
    """A hook that scales a parameter's gradient must scale it once, as in plain autograd."""
    block = LeakyLinear(4)
    calls = []
    handle = block.linear.weight.register_hook(lambda g: calls.append(1) or g * 2)
    try:
        x = torch.randn(3, 4, dtype=DT, requires_grad=True)
        call(block, x * 1).sum().backward()
        got = block.linear.weight.grad.clone()
        assert len(calls) == 1
        block.linear.weight.grad = None
        block(x * 1).sum().backward()
        assert_close(got, block.linear.weight.grad)
    finally:
        handle.remove()


def test_rng_marks_share_a_state_where_nothing_was_drawn():
    """A mark where no random number was drawn since the last one shares that state (a dropout with p = 0 draws
    none; a 5 KB state per mark held to the end of a long region grew its memory with depth); one after a draw
    is its own. The capture never refers to itself (a cycle would keep its state until the collector ran)."""
    from invfx.runtime.state import RngState

    state = RngState()
    first, again = state.mark("a"), state.mark("b")
    assert first is again and first is not state and first.cpu is state.cpu
    torch.rand(3)
    drawn, after = state.mark("c"), state.mark("d")
    assert drawn is after and drawn is not first and not torch.equal(drawn.cpu, first.cpu)
    assert all(mark is not state for mark in state.marks.values())
    replayed = torch.get_rng_state()
    drawn.set()
    assert torch.equal(torch.get_rng_state(), drawn.cpu)
    torch.set_rng_state(replayed)


def test_graft_refuses_a_second_backward_instead_of_giving_none():
    """Its sub-network's graph is differentiated once and let go; a second backward (retain_graph=True on the
    outside) raised AttributeError reading the freed box, and returning None gradients would be wrong."""
    from invfx.runtime import graft

    weight = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    stand_in = x.detach().requires_grad_()
    (out,) = graft([torch.tanh(stand_in @ weight)], [stand_in], [x], [weight])
    out.sum().backward(retain_graph=True)
    assert torch.allclose(weight.grad, x.detach().T @ (1 - torch.tanh(x.detach() @ weight.detach()) ** 2))
    with pytest.raises(invfx.RegionError, match="a second time"):
        out.sum().backward()
