"""FrEIA's normalizing flows (issue 18), optimized without any change to FrEIA's code: a ``SequenceINN`` of
``GLOWCouplingBlock``\\ s and of ``AllInOneBlock``\\ s around small conv and MLP sub-networks (with ReLU: their
branches are recorded for the recomputation on rebuilt inputs), on images and on vectors.

What is checked: optimize finds the blocks invertible (the plan's modes), the outputs and FrEIA's log-det are plain
FrEIA's, and every gradient (parameters and input) is plain autograd's, through a loss that reads the log-det as a
flow's negative log-likelihood does (the Glow stack once trained with parameter gradients off by 550 %: issue 14)
and through one weighing every output at random; activation memory is flat in depth (float32, measured); and what
cannot be handled is a one-line invfx error naming the module and what it does, or an opaque module the plan names.

The tracing constructs FrEIA needs are tested here without FrEIA too: ``torch.is_tensor`` on proxies (SequenceINN
wraps its input in a tuple only if it is a tensor), a size read from a value the rebuild makes (``a[:, :x.shape[1]]``,
AllInOneBlock), a scale that is a non-zero number times ``softplus`` of a parameter, a fixed permutation by indexing.
"""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, model_library
from torch import nn

import invfx
from invfx.errors import TraceError
from invfx.passes.trace import trace

GAIN = 0.2  # the sub-networks' last layer scaled down, as FrEIA's examples start a flow near the identity


def freia():
    return model_library("FrEIA.framework"), model_library("FrEIA.modules")


def _scaled(subnet):
    with torch.no_grad():
        subnet[-1].weight.mul_(GAIN)
        subnet[-1].bias.mul_(GAIN)
    return subnet


def conv_subnet(hidden=8):
    return lambda c_in, c_out: _scaled(nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
                                                     nn.Conv2d(hidden, c_out, 3, padding=1)))


def mlp_subnet(hidden=16):
    return lambda c_in, c_out: _scaled(nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out)))


def sequence(block, depth, dims, subnet, seed=0, **options):
    framework, modules = freia()
    torch.manual_seed(seed)
    sys.modules["numpy"].random.seed(seed)  # (FrEIA draws its permutations with NumPy)
    model = framework.SequenceINN(*dims)
    for _ in range(depth):
        model.append(getattr(modules, block), subnet_constructor=subnet, **options)
    return model


def nll(z, log_det):
    """A flow's negative log-likelihood (up to a constant): the loss FrEIA's users train with."""
    return z.pow(2).sum() / 2 - log_det.sum()


def step(module, x, loss):
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    z, log_det = module(x)
    loss(z, log_det).backward()
    return z.detach(), log_det.detach(), x.grad, [p.grad for p in module.parameters()]


def assert_trains_as_plain(model, optimized, x, rtol=1e-10, atol=1e-12, plain=None):
    """Outputs, log-det, input and every parameter gradient equal plain FrEIA's, through the NLL and through a
    loss weighing both outputs at random. (``plain``: the model's twin, copied before optimize.)"""
    if plain is None:
        plain = copy.deepcopy(model)  # (the optimized module shares model's parameters: compare on a twin)
    with torch.no_grad():
        z, log_det = plain(x)
    weights = torch.randn_like(z), torch.randn_like(log_det)
    for loss in (nll, lambda z, log_det: (weights[0] * z).sum() + (weights[1] * log_det).sum()):
        got, want = step(optimized, x, loss), step(plain, x, loss)
        assert_close(got[0], want[0], rtol, atol, "z")
        assert_close(got[1], want[1], rtol, atol, "log_det")
        assert_close(got[2], want[2], rtol, atol, "x.grad")
        names = [name for name, _ in plain.named_parameters()]
        assert len(got[3]) == len(want[3]) == len(names)
        for name, g, w in zip(names, got[3], want[3]):
            assert_close(g, w, rtol, atol, f"{name}.grad")


def modes_of(optimized):
    """Each plan row's mode by segment name (``inv_module_list_2``; kept segments in parentheses)."""
    return {row.name: str(row.mode) for row in optimized.plan.rows}


def assert_blocks_invertible(optimized, blocks):
    """Each of ``blocks`` (indices into the SequenceINN) is one invertible segment, of a region that frees its
    input; the plan's dict says the same."""
    modes = modes_of(optimized)
    for k in blocks:
        assert modes.get(f"inv_module_list_{k}") == "invertible", (k, modes)
    rows = {row["name"]: row for row in optimized.plan.to_dict()["segments"]}
    for k in blocks:
        row = rows[f"inv_module_list_{k}"]
        assert row["mode"] == "invertible" and row["freed"], row


# -- FrEIA's flows ------------------------------------------------------------------------------------------------


def test_glow_coupling_blocks_on_images_are_invertible_and_train_as_plain():
    model = sequence("GLOWCouplingBlock", 4, (4, 8, 8), conv_subnet()).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    optimized = invfx.optimize(model, x)
    # the first block reads the caller's input (never freed); the last one's output is the model's; between them
    # every block is one invertible segment, its running log-det included, and they run as one chain
    assert_blocks_invertible(optimized, [1, 2])
    regions = {row.name: row.region for row in optimized.plan.rows}
    assert regions["inv_module_list_1"] == regions["inv_module_list_2"]
    assert regions["inv_module_list_1"].startswith("inv_module_list_1_to_")
    assert optimized.plan.gradient_check.worst <= 1e-12
    assert_trains_as_plain(model, optimized, x)


def test_glow_coupling_blocks_with_tanh_and_sigmoid_clamps():
    for clamp in ("TANH", "SIGMOID"):
        model = sequence("GLOWCouplingBlock", 3, (4, 8, 8), conv_subnet(), clamp_activation=clamp).double()
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        optimized = invfx.optimize(model, x)
        assert_blocks_invertible(optimized, [1])
        assert_trains_as_plain(model, optimized, x)


def test_allinone_blocks_with_mlp_subnets_on_vectors_are_invertible_and_train_as_plain():
    """AllInOneBlock: affine coupling (``a *= 0.1``, tanh soft clamp, ``ch = x.shape[1]``), global affine scaling
    by ``0.1 * softplus(global_scale)``, a fixed permutation through ``F.linear`` with a frozen parameter, and a
    log-det with ``n_pixels = x_out[0, :1].numel()``."""
    model = sequence("AllInOneBlock", 4, (8,), mlp_subnet()).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    optimized = invfx.optimize(model, x)
    assert_blocks_invertible(optimized, [1, 2])
    rules = {r.name: r.why for r in optimized.plan.rows}
    assert "linear_inverse" in rules["inv_module_list_1"] and "mul_solve_input" in rules["inv_module_list_1"]
    assert_trains_as_plain(model, optimized, x)


def test_allinone_blocks_with_conv_subnets_on_images_are_invertible_and_train_as_plain():
    """On images the fixed permutation is a 1x1 convolution (``F.conv2d`` with a frozen (C, C, 1, 1) weight)."""
    model = sequence("AllInOneBlock", 4, (4, 8, 8), conv_subnet()).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    optimized = invfx.optimize(model, x)
    assert_blocks_invertible(optimized, [1, 2])
    assert "conv2d_1x1_inverse" in {r.name: r.why for r in optimized.plan.rows}["inv_module_list_1"]
    assert_trains_as_plain(model, optimized, x)


@pytest.mark.parametrize("options", [{"permute_soft": True}, {"reverse_permutation": True},
                                     {"global_affine_type": "SIGMOID"}, {"global_affine_type": "EXP"}],
                         ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()))
def test_allinone_block_options(options):
    """A rotation for a permutation, the permutation before the coupling too, and the other global scalings
    (``10 * sigmoid(a - 2)``, ``exp(a)``): every block between the first and last invertible."""
    model = sequence("AllInOneBlock", 3, (4, 8, 8), conv_subnet(), **options).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    optimized = invfx.optimize(model, x)
    assert_blocks_invertible(optimized, [1])
    assert_trains_as_plain(model, optimized, x)


def test_glow_with_random_permutations_actnorm_and_a_haar_squeeze():
    """Other blocks of FrEIA flows: PermuteRandom (``x[:, perm]``, a frozen index), ActNorm (initialised on data
    first: ``x * exp(scale) + bias``), HaarDownsampling (a stride-2 grouped 2x2 convolution, then a permutation)."""
    _, modules = freia()
    model = sequence("GLOWCouplingBlock", 0, (4, 8, 8), conv_subnet())
    for _ in range(3):
        model.append(modules.ActNorm)
        model.append(modules.GLOWCouplingBlock, subnet_constructor=conv_subnet())
        model.append(modules.PermuteRandom)
    model.append(modules.HaarDownsampling)
    model.append(modules.GLOWCouplingBlock, subnet_constructor=conv_subnet())
    model = model.double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model(x)  # ActNorm initialises itself on the first batch
    optimized = invfx.optimize(model, x)
    assert not optimized.plan.opaque
    modes = modes_of(optimized)
    for k in range(1, 8):  # coupling, permutation, ActNorm, ... (the tail before the last block may be kept)
        assert modes.get(f"inv_module_list_{k}") == "invertible", (k, modes)
    whys = " ".join(r.why for r in optimized.plan.rows)
    assert "index_permutation_inverse" in whys and "conv2d_patches_solve_input" in whys
    assert_trains_as_plain(model, optimized, x)


# -- memory flat in depth (float32) ------------------------------------------------------------------------------


def _depth_cell(build, depth, x):
    model = build(depth)
    optimized = invfx.optimize(model, x)
    peak = invfx.measure(optimized, x, loss=lambda out: nll(*out), steps=1).peak_bytes
    plain_peak = invfx.measure(model, x, loss=lambda out: nll(*out), steps=1).peak_bytes
    got, want = step(optimized, x, nll), step(copy.deepcopy(model), x, nll)
    errors = [float((g - w).norm() / w.norm()) for g, w in zip([got[2], *got[3]], [want[2], *want[3]])
              if w is not None and w.norm() > 0]
    return optimized, peak, plain_peak, max(errors)


@pytest.mark.slow
@pytest.mark.parametrize("block", ["GLOWCouplingBlock", "AllInOneBlock"])
def test_peak_is_flat_in_depth_and_gradients_stay_plain_at_depth_32(block):
    """Measured CPU peak of one training step (invfx.measure, the NLL): depth 32 within 10 % of depth 8, while
    plain autograd's grows about 4x; at depth 32 every gradient within 1e-4 (relative, by norm) of plain
    autograd's in float32. (Measured: Glow 654 KB against 628 KB, 1.04; AllInOne 305 KB against 299 KB, 1.02;
    worst gradient error 4e-7.)"""
    if block == "GLOWCouplingBlock":
        x = torch.randn(16, 4, 8, 8)
        build = lambda depth: sequence(block, depth, (4, 8, 8), conv_subnet(32))  # noqa: E731
    else:
        x = torch.randn(256, 16)
        build = lambda depth: sequence(block, depth, (16,), mlp_subnet(64))  # noqa: E731
    _, peak_8, plain_8, _ = _depth_cell(build, 8, x)
    optimized, peak_32, plain_32, error = _depth_cell(build, 32, x)
    assert peak_32 <= 1.1 * peak_8, (peak_8, peak_32)
    assert plain_32 > 3 * plain_8 and peak_32 < plain_32 / 4, (plain_8, plain_32, peak_32)
    assert error <= 1e-4, error
    modes = modes_of(optimized)
    assert sum(mode == "invertible" for name, mode in modes.items() if name.startswith("inv_module_list_")) >= 28


# -- what cannot be handled -------------------------------------------------------------------------------------


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def test_a_block_that_stores_what_it_computes_is_an_opaque_module_the_plan_names():
    """AllInOneBlock with learned Householder reflections sets ``self.w_perm`` in its forward: its trace is refused
    (the proxy is never stored), the block runs whole, the plan says which and why, and it trains as plain. The
    gradient check's deep copy of the model then meets the tensor stored with grad: a one-line invfx error."""
    model = sequence("AllInOneBlock", 3, (8,), mlp_subnet(), learned_householder_permutation=2).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    plain = copy.deepcopy(model)  # (after a forward with grad, the model holds w_perm, which no deep copy takes)
    optimized = invfx.optimize(model, x, check_gradients=False)
    assert set(optimized.plan.opaque) == {"module_list.0", "module_list.1", "module_list.2"}
    assert all("stores a value it computes as self.w_perm" in why for why in optimized.plan.opaque.values())
    assert "not traced (kept as one opaque module): module_list.0" in str(optimized.plan)
    assert all(not isinstance(block.w_perm, torch.fx.Proxy) for block in model.module_list)
    assert_trains_as_plain(model, optimized, x, plain=plain)
    with pytest.raises(invfx.InvfxError) as error:
        invfx.optimize(model, x)
    assert "module 'module_list.0' (AllInOneBlock) holds w_perm" in _one_line(error)


def test_a_layer_that_differentiates_in_its_forward_is_a_one_line_error():
    """IResNetLayer estimates its log-det with torch.autograd.grad inside its forward: it cannot run without grad
    (a checkpoint's forward, the analysis)."""
    framework, modules = freia()
    model = framework.SequenceINN(8)
    model.append(modules.IResNetLayer, hutchinson_samples=1, internal_size=8, n_internal_layers=1)
    with pytest.raises(invfx.InvfxError) as error:
        invfx.optimize(model, torch.randn(4, 8))
    text = _one_line(error)
    assert "module 'module_list.0', IResNetLayer" in text and "differentiates inside its forward" in text


def test_actnorm_not_yet_initialised_is_a_one_line_error():
    """ActNorm initialises its parameters from the first batch it sees (through ``.data``): invfx's run on the
    example would be that batch. Refused, naming the module; once run on data it is optimized as any other."""
    framework, modules = freia()
    model = framework.SequenceINN(4, 8, 8)
    model.append(modules.ActNorm)
    model.append(modules.GLOWCouplingBlock, subnet_constructor=conv_subnet())
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(invfx.InvfxError) as error:
        invfx.optimize(model, x)
    assert "module 'module_list.0' (ActNorm) writes into its parameter 'scale'" in _one_line(error)
    invfx.optimize(model, x)  # (initialised now, by that run)


def test_a_condition_list_is_a_one_line_error():
    """A conditional block's conditions are a list (``inn(x, c=[cond])``): example inputs are tensors."""
    framework, modules = freia()
    model = framework.SequenceINN(8)
    model.append(modules.AllInOneBlock, cond=0, cond_shape=(3,), subnet_constructor=mlp_subnet())
    with pytest.raises(invfx.InvfxError) as error:
        invfx.optimize(model, (torch.randn(4, 8), [torch.randn(4, 3)]))
    assert "example_inputs[1] is a list" in _one_line(error)


# -- the constructs, without FrEIA --------------------------------------------------------------------------------


class WrapsTensors(nn.Module):
    """FrEIA's SequenceINN: a tensor is wrapped in a tuple, blocks index it."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        if torch.is_tensor(x):
            x = (x,)
        sizes = x[0].shape
        assert not torch.is_tensor(sizes) and not torch.is_tensor(x[0].numel()) and torch.is_tensor(x[0].t())
        halves = x[0].chunk(2, 1)
        assert not torch.is_tensor(halves) and torch.is_tensor(halves[0])
        return self.layer(x[0]) * 2


def test_is_tensor_answers_for_proxies():
    model = WrapsTensors()
    x = torch.randn(3, 4)
    traced, _, _ = trace(model, inputs=(x,))
    assert_close(traced(x), model(x))
    optimized = invfx.optimize(model, x)
    assert_close(optimized(x), model(x))


def test_is_tensor_on_a_value_fx_cannot_type_is_a_trace_error():
    class Leaf(nn.Module):
        def forward(self, x):
            return x + 1

    class Asks(nn.Module):
        def __init__(self):
            super().__init__()
            self.leaf = Leaf()

        def forward(self, x):
            y = self.leaf(x)
            return y * 2 if torch.is_tensor(y) else y[0]

    with pytest.raises(TraceError, match=r"torch.is_tensor\(leaf\): whether module 'leaf' gives a tensor cannot be "
                                         r"told while tracing"):
        trace(Asks(), leaf_modules=[Leaf], inputs=(torch.randn(2, 2),))
    assert torch.is_tensor(torch.randn(1)) and not torch.is_tensor([1])  # (put back)


class SizedCoupling(nn.Module):
    """AllInOneBlock's coupling: ``a[:, :x2.shape[1]]`` rebuilds ``x2`` from a size of ``x2``, and a global scale
    ``0.1 * softplus(p)`` then a fixed permutation by index."""

    def __init__(self, width=6):
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.net = nn.Sequential(nn.Linear(width // 2, 16), nn.ReLU(), nn.Linear(16, width))
        self.scale = nn.Parameter(torch.randn(1, width))
        self.register_buffer("perm", torch.randperm(width))

    def forward(self, x):
        h = self.stem(x)
        x1, x2 = torch.split(h, [3, 3], dim=1)
        a = self.net(x1) * 0.1
        ch = x2.shape[1]
        s = torch.tanh(a[:, :ch])
        y2 = x2 * torch.exp(s) + a[:, ch:]
        y = torch.cat((x1, y2), 1) * (0.1 * nn.functional.softplus(self.scale))
        return y[:, self.perm], torch.sum(s, dim=1)


def test_a_size_read_from_a_rebuilt_value_and_a_derived_scale_and_an_index_permutation():
    model = SizedCoupling().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    optimized = invfx.optimize(model, x, modes=("keep", "invertible"))
    rows = [r for r in optimized.plan.rows if str(r.mode) == "invertible"]
    whys = " ".join(r.why for r in rows)
    for rule in ("mul_solve_input", "index_permutation_inverse", "split_inverse"):
        assert rule in whys, whys
    assert [n for r in rows for n in r.freed] and "stem" in [n for r in rows for n in r.freed]
    assert_trains_as_plain(model, optimized, x)


def test_the_benchmark_builders():
    """benchmarks/zoo_models.py: what benchmarks/zoo.py optimizes."""
    freia()  # (skipped without FrEIA)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo_models.py"
    spec = importlib.util.spec_from_file_location("_invfx_zoo_models", path)
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    for build, kwargs, shape in ((zoo.freia_glow, {}, (16, 4, 16, 16)), (zoo.freia_glow, {"image": False}, (256, 16)),
                                 (zoo.freia_allinone, {}, (256, 16)),
                                 (zoo.freia_allinone, {"image": True}, (16, 4, 16, 16))):
        model, x = build(3, **kwargs)
        assert tuple(x.shape) == shape and model.training
        z, log_det = model(x)
        assert z.shape == x.shape and log_det.shape == (shape[0],)
        zoo.freia_nll((z, log_det)).backward()
    model, x = zoo.freia_glow(3, batch=2, size=8)
    again, y = zoo.freia_glow(3, batch=2, size=8)
    assert torch.equal(x, y) and all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
