"""The invertible layer catalogue (invfx.nn.flows): inverses, log-determinants, and training in every mode
against plain autograd on the same weights."""

import contextlib
import copy
import math

import pytest
import torch
from helpers import assert_close, grads_of, zero
from torch import nn

import invfx
import invfx.nn as inn
from invfx.runtime.storage import is_freed
from invfx.utils import pack

DT = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-10}


def mlp(features_in, features_out, hidden=5, dropout=0.0, batchnorm=False):
    layers = [nn.Linear(features_in, hidden, dtype=DT)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden, dtype=DT))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, features_out, dtype=DT))
    return nn.Sequential(*layers)


def convnet(channels_in, channels_out, hidden=4):
    return nn.Sequential(nn.Conv2d(channels_in, hidden, 3, padding=1, dtype=DT), nn.Tanh(),
                         nn.Conv2d(hidden, channels_out, 1, dtype=DT))


def actnorm(features, **kwargs):
    layer = inn.ActNorm(features, **kwargs).double()
    with torch.no_grad():  # random, already initialised: no data-dependent init in these tests
        layer.loc.normal_()
        layer.logs.normal_(0.0, 0.5)
        layer.initialized.fill_(True)
    return layer


def lu_perturbed(layer):
    with torch.no_grad():
        for p in (layer.lower, layer.upper, layer.log_abs_s):
            p.add_(0.2 * torch.randn_like(p))
    return layer


# name -> (factory(logdet), input shapes)
LAYERS = {
    "additive": (lambda ld: inn.AdditiveCoupling(mlp(3, 3), logdet=ld), [(4, 6)]),
    "additive_G_two_tensors": (lambda ld: inn.AdditiveCoupling(mlp(3, 2), mlp(2, 3), logdet=ld), [(4, 2), (4, 3)]),
    "additive_G_conv": (lambda ld: inn.AdditiveCoupling(convnet(2, 2), convnet(2, 2), logdet=ld), [(2, 4, 3, 3)]),
    "affine_sigmoid_conv": (lambda ld: inn.AffineCoupling(convnet(2, 4), logdet=ld), [(2, 4, 3, 3)]),
    "affine_exp_two_tensors": (lambda ld: inn.AffineCoupling(mlp(3, 4), scale="exp", clamp=1.5, logdet=ld),
                               [(4, 2), (4, 3)]),
    "affine_exp_last_dim": (lambda ld: inn.AffineCoupling(mlp(3, 6), dim=-1, scale="exp", logdet=ld), [(4, 6)]),
    "checkerboard": (lambda ld: inn.CheckerboardCoupling(convnet(2, 4), logdet=ld), [(2, 2, 4, 4)]),
    "checkerboard_channel_exp": (lambda ld: inn.CheckerboardCoupling(convnet(4, 8), mask="channel", parity=1,
                                                                     scale="exp", logdet=ld), [(2, 4, 3, 3)]),
    "actnorm": (lambda ld: actnorm(4, logdet=ld), [(3, 4, 2, 3)]),
    "actnorm_2d": (lambda ld: actnorm(5, logdet=ld), [(4, 5)]),
    "linear": (lambda ld: lu_perturbed(inn.InvertibleLinear(5, logdet=ld).double()), [(4, 5)]),
    "linear_3d": (lambda ld: lu_perturbed(inn.InvertibleLinear(3, logdet=ld).double()), [(2, 4, 3)]),
    "conv1x1": (lambda ld: lu_perturbed(inn.InvertibleConv1x1(4, logdet=ld).double()), [(2, 4, 3, 3)]),
    "permutation": (lambda ld: inn.Permutation(6, seed=3, logdet=ld), [(4, 6)]),
    "permutation_conv": (lambda ld: inn.Permutation(4, logdet=ld), [(2, 4, 2, 3)]),
    "reverse": (lambda ld: inn.Reverse(logdet=ld), [(2, 4, 2, 3)]),
    "reverse_last_dim": (lambda ld: inn.Reverse(dim=-1, logdet=ld), [(3, 5)]),
    "squeeze": (lambda ld: inn.Squeeze(logdet=ld), [(2, 2, 4, 6)]),
    "squeeze_3": (lambda ld: inn.Squeeze(3, logdet=ld), [(1, 1, 3, 6)]),
    "haar": (lambda ld: inn.HaarDownsampling(logdet=ld), [(2, 2, 4, 6)]),
}
NAMES = sorted(LAYERS)


def make(name, logdet=False):
    factory, shapes = LAYERS[name]
    return factory(logdet).double(), shapes


def randn(shapes, dtype=DT):
    return [torch.randn(s, dtype=dtype) for s in shapes]


def loss_of(outputs):
    return sum(o.pow(2).sum() + o.sum() for o in outputs)


def train_step(model, shapes, free=True, loss=loss_of, seed=11):
    """One step on fresh inputs (non-leaves, handed to the model as freeable); outputs, input and param grads."""
    torch.manual_seed(seed)
    leaves = [torch.randn(s, dtype=DT, requires_grad=True) for s in shapes]
    hidden = [leaf * 1.5 for leaf in leaves]
    zero(model.parameters())
    with inn.free(*hidden) if free else contextlib.nullcontext():
        out = pack(model(*hidden))
    loss(out).backward()
    return [o.detach() for o in out], grads_of(leaves), grads_of(model.parameters())


MODES = {"checkpoint": {"invertible": False}, "invertible": {"invertible": True}}


def assert_modes_match_plain(model, step, **tolerance):
    with inn.mode(model, checkpoint=False):
        expected = step()
    for name, flags in MODES.items():
        with inn.mode(model, **flags):
            assert_close(step(), expected, what=name, **(tolerance or TIGHT))
    return expected


# ----------------------------------------------------------------------------------------------------------
# (a) inverses


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("logdet", [False, True], ids=["", "logdet"])
def test_check_inverse_float64_and_float32(name, logdet):
    layer, shapes = make(name, logdet)
    layer.eval()
    assert layer.check_inverse(*randn(shapes), rtol=1e-9, atol=1e-12)
    layer.float()
    assert layer.check_inverse(*randn(shapes, torch.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_inverse_is_not_the_identity(name):
    """check_inverse would pass for a layer that does nothing: each layer changes its input."""
    layer, shapes = make(name)
    xs = randn(shapes)
    with torch.no_grad():
        ys = pack(layer(*xs))
    assert any(y.shape != x.shape or not torch.allclose(y, x) for x, y in zip(xs, ys))


def test_lu_layers_use_triangular_solves_not_a_general_inverse(monkeypatch):
    layers = [make("linear")[0], make("conv1x1")[0]]
    xs = [randn([(3, 5)])[0], randn([(2, 4, 3, 3)])[0]]

    def refuse(*args, **kwargs):
        raise AssertionError("general inverse used")

    for name in ("inv", "solve", "pinv", "lu_solve"):
        monkeypatch.setattr(torch.linalg, name, refuse)
    monkeypatch.setattr(torch, "inverse", refuse)
    for layer, x in zip(layers, xs):
        assert layer.check_inverse(x, rtol=1e-9, atol=1e-12)


def test_lu_layers_start_orthogonal_and_factor_their_weight():
    layer = inn.InvertibleLinear(6).double()
    w = layer.weight()
    assert_close(w @ w.T, torch.eye(6, dtype=DT), rtol=0, atol=1e-5)
    assert abs(float(layer.log_abs_s.detach().sum())) < 1e-5
    lower, upper = layer._factors()
    assert torch.equal(torch.tril(lower, -1), lower - torch.eye(6, dtype=DT))
    assert torch.equal(torch.triu(upper), upper)
    assert set(dict(layer.named_buffers())) >= {"permutation", "sign"}


def test_haar_bands_are_average_and_details():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DT).view(1, 1, 2, 2)
    y = inn.HaarDownsampling()(x)
    assert_close(y.flatten(), torch.tensor([10.0, -2.0, -4.0, 0.0], dtype=DT) / 2)
    two = torch.randn(1, 3, 2, 2, dtype=DT)
    bands = inn.HaarDownsampling()(two)
    assert_close(bands[:, :3, 0, 0], two.sum((2, 3)) / 2)  # channels [0, C) are the averages


def test_permutation_seed_is_reproducible():
    assert torch.equal(inn.Permutation(10, seed=5).perm, inn.Permutation(10, seed=5).perm)
    assert sorted(inn.Permutation(10).perm.tolist()) == list(range(10))


# ----------------------------------------------------------------------------------------------------------
# (b) training in every mode equals plain


@pytest.mark.parametrize("name", NAMES)
def test_layer_trains_like_plain_in_every_mode(name):
    layer, shapes = make(name, logdet=True)
    assert_modes_match_plain(layer, lambda: train_step(layer, shapes))


@pytest.mark.parametrize("name", ["additive", "additive_G_conv", "affine_sigmoid_conv", "checkerboard"])
def test_lone_call_without_free_trains_like_plain(name):
    """Inputs the runtime may not free: the fused replay recomputes from the kept inputs."""
    layer, shapes = make(name)
    assert_modes_match_plain(layer, lambda: train_step(layer, shapes, free=False))


@pytest.mark.parametrize("name", ["additive", "additive_G_two_tensors", "additive_G_conv", "affine_sigmoid_conv",
                                  "affine_exp_last_dim", "checkerboard", "checkerboard_channel_exp"])
def test_couplings_free_their_input_and_restore_it(name):
    layer, shapes = make(name)
    leaves = randn(shapes)
    for leaf in leaves:
        leaf.requires_grad_()
    hidden = [leaf * 1.5 for leaf in leaves]
    values = [h.detach().clone() for h in hidden]
    with inn.free(*hidden):
        out = pack(layer(*hidden))
    freed = [is_freed(h) for h in hidden]
    # the first stream (or the single tensor) is freed; an identity second stream (y2 = x2) is the output itself
    assert freed[0] and all(freed) == (len(hidden) == 1 or "_G_" in name)
    loss_of(out).backward()
    assert not any(is_freed(h) for h in hidden)
    assert_close(hidden, values, **TIGHT)


def single_chain():
    """(2, 2, 4, 4) -> (2, 32, 1, 1) through every single-tensor 4-D layer."""
    return inn.InvertibleSequential(
        inn.Squeeze(),
        actnorm(8),
        lu_perturbed(inn.InvertibleConv1x1(8).double()),
        inn.AffineCoupling(convnet(4, 8)),
        inn.AdditiveCoupling(convnet(4, 4), convnet(4, 4)),
        inn.CheckerboardCoupling(convnet(8, 16)),
        inn.CheckerboardCoupling(convnet(8, 16), mask="channel", parity=1, scale="exp"),
        inn.Permutation(8),
        inn.Reverse(),
        inn.HaarDownsampling(),
    ).double()


def flat_chain():
    return inn.InvertibleSequential(
        lu_perturbed(inn.InvertibleLinear(6).double()),
        actnorm(6),
        inn.AdditiveCoupling(mlp(3, 3)),
        inn.AffineCoupling(mlp(3, 6), dim=-1, scale="exp"),
        inn.Permutation(6),
        inn.AffineCoupling(mlp(3, 6)),
        inn.Reverse(),
        inn.AdditiveCoupling(mlp(3, 3), mlp(3, 3)),
    ).double()


def two_tensor_chain():
    return inn.InvertibleSequential(
        inn.AdditiveCoupling(mlp(3, 2), mlp(2, 3)),
        inn.AffineCoupling(mlp(3, 4)),
        inn.AdditiveCoupling(mlp(3, 2)),
        inn.AffineCoupling(mlp(3, 4), scale="exp"),
    ).double()


@pytest.mark.parametrize("chain, shapes", [(single_chain, [(2, 2, 4, 4)]), (flat_chain, [(3, 6)]),
                                           (two_tensor_chain, [(3, 2), (3, 3)])],
                         ids=["conv", "flat", "two_tensors"])
def test_chain_in_invertible_sequential_trains_like_plain(chain, shapes):
    model = chain()
    assert model.check_inverse(*randn(shapes), rtol=1e-9, atol=1e-12)
    assert_modes_match_plain(model, lambda: train_step(model, shapes, free=False), rtol=1e-8, atol=1e-9)


def test_whole_chain_as_one_region_with_dropout():
    """Two couplings in one region: their rng marks must not collide, and dropout replays its masks."""
    model = inn.InvertibleSequential(inn.AdditiveCoupling(mlp(3, 3, dropout=0.5), mlp(3, 3, dropout=0.5)),
                                     inn.AffineCoupling(mlp(3, 6, dropout=0.5)),
                                     inn.AdditiveCoupling(mlp(3, 3, dropout=0.5))).double()
    with inn.mode(model, checkpoint=False):
        expected = train_step(model, [(4, 6)])
    model.invertible = True
    assert_close(train_step(model, [(4, 6)]), expected, **TIGHT)


# ----------------------------------------------------------------------------------------------------------
# (c) log-determinants


def flat_jacobian(layer, xs):
    def outputs(*inputs):
        return torch.cat([o.reshape(-1) for o in pack(layer.function(*inputs))[:-1]])

    jac = torch.autograd.functional.jacobian(outputs, tuple(xs))
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


@pytest.mark.parametrize("name", NAMES)
def test_logdet_equals_slogdet_of_the_jacobian(name):
    layer, shapes = make(name, logdet=True)
    layer.eval()
    xs = randn([(1, *s[1:]) for s in shapes])
    with torch.no_grad():
        logdet = pack(layer(*xs))[-1]
    assert logdet.shape == (1,)
    sign, logabsdet = torch.linalg.slogdet(flat_jacobian(layer, xs))
    assert sign != 0
    assert_close(logdet[0], logabsdet, rtol=1e-9, atol=1e-9)
    # per sample: a batch's logdets are the samples' own
    batch = randn([(3, *s[1:]) for s in shapes])
    with torch.no_grad():
        together = pack(layer(*batch))[-1]
        alone = torch.cat([pack(layer(*(b[i:i + 1] for b in batch)))[-1] for i in range(3)])
    assert together.shape == (3,)
    assert_close(together, alone, **TIGHT)


def test_logdet_false_returns_only_the_outputs_and_inverse_drops_the_logdet():
    layer, _ = make("affine_sigmoid_conv")
    x = torch.randn(2, 4, 3, 3, dtype=DT)
    assert isinstance(layer(x), torch.Tensor)
    with_logdet, _ = make("affine_sigmoid_conv", logdet=True)
    y, logdet = with_logdet.function(x)
    assert isinstance(with_logdet.inverse(y, logdet), torch.Tensor)
    two, _ = make("additive_G_two_tensors", logdet=True)
    y1, y2, zeros = two.function(torch.randn(4, 2, dtype=DT), torch.randn(4, 3, dtype=DT))
    assert torch.equal(zeros, torch.zeros(4, dtype=DT))
    assert len(two.inverse(y1, y2, zeros)) == 2


# ----------------------------------------------------------------------------------------------------------
# (d) fused replays: each sub-network runs once in backward; dropout and BatchNorm


def counted(module, counts, key):
    counts[key] = 0

    def hook(*_):
        counts[key] += 1

    module.register_forward_hook(hook)
    return module


def subnet(features_in, features_out):
    return mlp(features_in, features_out, dropout=0.3, batchnorm=True)


def dropout_batchnorm_couplings(counts):
    """name -> builder of (coupling whose sub-networks have dropout and BatchNorm, counted; input shapes)."""
    def c(module, key):
        return counted(module, counts, key)

    return {
        "additive_G_single": lambda: (inn.AdditiveCoupling(c(subnet(4, 4), "F"), c(subnet(4, 4), "G")), [(6, 8)]),
        "additive_G_two_tensors": lambda: (inn.AdditiveCoupling(c(subnet(4, 3), "F"), c(subnet(3, 4), "G")),
                                           [(6, 3), (6, 4)]),
        "additive_single": lambda: (inn.AdditiveCoupling(c(subnet(4, 4), "F")), [(6, 8)]),
        "additive_two_tensors": lambda: (inn.AdditiveCoupling(c(subnet(4, 3), "F")), [(6, 3), (6, 4)]),
        "affine_single": lambda: (inn.AffineCoupling(c(subnet(4, 8), "net"), logdet=True), [(6, 8)]),
        "affine_two_tensors": lambda: (inn.AffineCoupling(c(subnet(4, 6), "net"), scale="exp", logdet=True),
                                       [(6, 3), (6, 4)]),
        "checkerboard": lambda: (inn.CheckerboardCoupling(c(nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, dtype=DT), nn.BatchNorm2d(3, dtype=DT), nn.Tanh(), nn.Dropout(0.3),
            nn.Conv2d(3, 4, 1, dtype=DT)), "net"), logdet=True), [(3, 2, 4, 4)]),
    }


FUSED = sorted(dropout_batchnorm_couplings({}))


@pytest.mark.parametrize("name", FUSED)
def test_fused_replay_runs_each_subnetwork_once_in_backward(name):
    counts = {}
    layer, shapes = dropout_batchnorm_couplings(counts)[name]()
    layer.double().train()
    initial = copy.deepcopy(layer.state_dict())

    def step():
        layer.load_state_dict(initial)
        for key in counts:
            counts[key] = 0
        result = train_step(layer, shapes)
        stats = [v.clone() for k, v in layer.state_dict().items() if "running" in k or "tracked" in k]
        return result, stats, dict(counts)

    with inn.mode(layer, checkpoint=False):
        (expected, stats, plain_counts) = step()
    assert stats and set(plain_counts.values()) == {1}
    for mode, flags in MODES.items():
        with inn.mode(layer, **flags):
            got, got_stats, got_counts = step()
        assert_close(got, expected, what=mode, **TIGHT)
        assert_close(got_stats, stats, what=f"{mode} BatchNorm statistics", **TIGHT)
        assert set(got_counts.values()) == {2}, (mode, got_counts)  # forward + one replay in backward
    # without the fused replay, the invertible backward runs each sub-network twice (inverse, recomputation)
    layer.replay = None
    _, _, unfused_counts = step()
    assert set(unfused_counts.values()) == {3}


# ----------------------------------------------------------------------------------------------------------
# ActNorm's data-dependent initialisation


def test_actnorm_initialises_on_the_first_training_forward():
    layer = inn.ActNorm(3).double()
    x = torch.randn(8, 3, 4, 4, dtype=DT) * torch.tensor([1.0, 3.0, 0.5], dtype=DT).view(1, 3, 1, 1) + 2
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), x) and not layer.initialized  # eval: identity, no initialisation
    layer.train()
    y = layer(x)
    assert bool(layer.initialized)
    assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=DT), rtol=0, atol=1e-10)
    assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(3, dtype=DT), rtol=1e-5, atol=1e-5)
    loc = layer.loc.detach().clone()
    layer(torch.randn(8, 3, 4, 4, dtype=DT))  # a second batch does not re-initialise
    assert torch.equal(layer.loc, loc)
    state = layer.state_dict()
    assert "initialized" in state
    fresh = inn.ActNorm(3).double()
    fresh.load_state_dict(state)
    fresh(torch.randn(8, 3, 4, 4, dtype=DT))
    assert torch.equal(fresh.loc, loc)
    layer.load_state_dict(inn.ActNorm(3).double().state_dict())  # an uninitialised state: initialise again
    assert_close(layer(x).mean((0, 2, 3)), torch.zeros(3, dtype=DT), rtol=0, atol=1e-10)
    assert bool(layer.initialized)


def test_actnorm_initialisation_inside_a_region_matches_plain():
    fresh = inn.ActNorm(4, logdet=True).double()
    results = {}
    for mode, flags in {"plain": {"checkpoint": False}, **MODES}.items():
        layer = copy.deepcopy(fresh)
        with inn.mode(layer, **flags):
            results[mode] = train_step(layer, [(5, 4, 2, 2)]), [p.detach().clone() for p in layer.parameters()]
        assert bool(layer.initialized)
    for mode in MODES:
        assert_close(results[mode], results["plain"], what=mode, **TIGHT)


# ----------------------------------------------------------------------------------------------------------
# (e) bad arguments


@pytest.mark.parametrize("build, match", [
    (lambda: inn.AffineCoupling(mlp(2, 4), scale="tanh"), "AffineCoupling.*'tanh'"),
    (lambda: inn.AffineCoupling(mlp(2, 4), scale="exp", clamp=0), "AffineCoupling.*clamp.*0"),
    (lambda: inn.AffineCoupling(mlp(2, 4), clamp=-1.0), "AffineCoupling.*-1.0"),
    (lambda: inn.AffineCoupling(lambda x: x), "AffineCoupling.*net.*function"),
    (lambda: inn.AffineCoupling(mlp(2, 4), dim=0), "AffineCoupling.*dim.*0"),
    (lambda: inn.AdditiveCoupling("F"), "AdditiveCoupling.*F.*str"),
    (lambda: inn.AdditiveCoupling(mlp(2, 2), G=3), "AdditiveCoupling.*G.*int"),
    (lambda: inn.CheckerboardCoupling(convnet(2, 4), mask="stripes"), "CheckerboardCoupling.*'stripes'"),
    (lambda: inn.CheckerboardCoupling(convnet(2, 4), parity=2), "CheckerboardCoupling.*parity.*2"),
    (lambda: inn.CheckerboardCoupling(convnet(2, 4), scale="softplus"), "CheckerboardCoupling.*'softplus'"),
    (lambda: inn.CheckerboardCoupling(convnet(2, 4), scale="exp", clamp=float("inf")), "CheckerboardCoupling.*inf"),
    (lambda: inn.ActNorm(0), "ActNorm.*num_features.*0"),
    (lambda: inn.ActNorm(3, dim=0), "ActNorm.*dim.*0"),
    (lambda: inn.InvertibleLinear(2.5), "InvertibleLinear.*2.5"),
    (lambda: inn.InvertibleConv1x1(-1), "InvertibleConv1x1.*-1"),
    (lambda: inn.Permutation(4, seed="x"), "Permutation.*seed.*'x'"),
    (lambda: inn.Permutation(0), "Permutation.*0"),
    (lambda: inn.Reverse(dim=0), "Reverse.*dim.*0"),
    (lambda: inn.Squeeze(0), "Squeeze.*factor.*0"),
])
def test_bad_constructor_arguments_raise(build, match):
    with pytest.raises(invfx.InvfxError, match=match):
        build()


@pytest.mark.parametrize("layer, x, match", [
    (lambda: inn.Squeeze(), (1, 2, 5, 4), r"Squeeze.*\(5, 4\).*\(1, 2, 5, 4\).*divisible by 2"),
    (lambda: inn.Squeeze(3), (1, 2, 6, 4), r"Squeeze.*\(1, 2, 6, 4\).*divisible by 3"),
    (lambda: inn.Squeeze(), (2, 8), r"Squeeze.*\(N, C, H, W\).*\(2, 8\)"),
    (lambda: inn.HaarDownsampling(), (1, 1, 4, 3), r"HaarDownsampling.*\(1, 1, 4, 3\).*divisible by 2"),
    (lambda: inn.AdditiveCoupling(mlp(2, 2)), (2, 5), r"AdditiveCoupling.*\(2, 5\).*odd"),
    (lambda: inn.AffineCoupling(convnet(1, 2)), (2, 3, 2, 2), r"AffineCoupling.*\(2, 3, 2, 2\).*odd"),
    (lambda: inn.AffineCoupling(mlp(2, 2)), (2, 4), r"AffineCoupling.*s and t.*\(2, 1\).*\(2, 2\)"),
    (lambda: inn.AdditiveCoupling(mlp(2, 3)), (2, 4), r"AdditiveCoupling.*F\(x2\).*\(2, 3\)"),
    (lambda: inn.CheckerboardCoupling(convnet(3, 6), mask="channel"), (1, 3, 2, 2), r"CheckerboardCoupling.*3 ch"),
    (lambda: inn.CheckerboardCoupling(convnet(2, 2)), (1, 2, 2, 2), r"CheckerboardCoupling.*net output"),
    (lambda: inn.ActNorm(3), (2, 4), r"ActNorm.*3 features.*\(2, 4\)"),
    (lambda: inn.Permutation(3), (2, 4), r"Permutation.*3 features.*\(2, 4\)"),
    (lambda: inn.InvertibleLinear(3), (2, 4), r"InvertibleLinear.*\(2, 4\)"),
    (lambda: inn.InvertibleConv1x1(3), (2, 4, 1, 1), r"InvertibleConv1x1.*\(2, 4, 1, 1\)"),
])
def test_bad_input_shapes_raise(layer, x, match):
    module = layer().double()
    with pytest.raises(invfx.InvfxError, match=match):
        module(torch.randn(x, dtype=DT))


def test_bad_inverse_inputs_raise():
    with pytest.raises(invfx.InvfxError, match=r"Squeeze.*inverse.*divisible by 4.*\(1, 6, 2, 2\)"):
        inn.Squeeze().inverse(torch.randn(1, 6, 2, 2))
    with pytest.raises(invfx.InvfxError, match="AffineCoupling.*logdet=True.*inverse"):
        inn.AffineCoupling(mlp(1, 2), logdet=True).inverse(torch.randn(2, 2))
    with pytest.raises(invfx.InvfxError, match="AdditiveCoupling.*3 inputs"):
        inn.AdditiveCoupling(mlp(1, 1))(*torch.randn(3, 2, 1))


# ----------------------------------------------------------------------------------------------------------
# (f) a small Glow


def glow():
    layers = []
    channels = 1
    for _ in range(2):
        channels *= 4
        layers += [inn.Squeeze(logdet=True), inn.ActNorm(channels, logdet=True),
                   inn.InvertibleConv1x1(channels, logdet=True),
                   inn.AffineCoupling(convnet(channels // 2, channels), logdet=True)]
    return nn.ModuleList(layers).double()


def run_flow(layers, x):
    """Chain the layers, summing their logdets; each link is handed to the next layer as freeable."""
    z, logdet = x, 0
    for index, layer in enumerate(layers):
        with inn.free(*((z,) if index else ())):
            z, step = layer(z)
        logdet = logdet + step
    return z, logdet


def nll(z, logdet):
    log_normal = -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)
    return -(log_normal + logdet).mean()


def test_glow_trains_like_plain_with_data_dependent_init():
    fresh = glow()
    results = {}
    for mode, flags in {"plain": {"checkpoint": False}, **MODES}.items():
        flow = copy.deepcopy(fresh)  # each mode initialises its ActNorms on its first (training) batch
        with inn.mode(flow, **flags):
            torch.manual_seed(5)
            x = torch.randn(3, 1, 8, 8, dtype=DT, requires_grad=True)
            z, logdet = run_flow(flow, x * 1)
            assert z.shape == (3, 16, 2, 2) and logdet.shape == (3,)
            nll(z, logdet).backward()
        assert all(bool(m.initialized) for m in flow if isinstance(m, inn.ActNorm))
        results[mode] = (z.detach(), logdet.detach(), x.grad, grads_of(flow.parameters()),
                         [p.detach().clone() for p in flow.parameters()])
    for mode in MODES:
        assert_close(results[mode], results["plain"], what=mode, rtol=1e-8, atol=1e-9)
    # the flow inverts: z back to x
    flow = copy.deepcopy(fresh)
    x = torch.randn(2, 1, 8, 8, dtype=DT)
    with torch.no_grad():
        z, _ = run_flow(flow, x)
        for layer in reversed(flow):
            z = layer.inverse(z, None)
    assert_close(z, x, **TIGHT)


# ----------------------------------------------------------------------------------------------------------
# the fused replays under other backward calls


@pytest.mark.parametrize("name", ["additive_G_conv", "affine_sigmoid_conv", "checkerboard"])
def test_fused_replay_second_backward_with_retain_graph(name):
    layer, shapes = make(name, logdet=True)

    def step():
        torch.manual_seed(2)
        x = torch.randn(shapes[0], dtype=DT, requires_grad=True)
        h = x * 1
        zero(layer.parameters())
        with inn.free(h):
            loss = loss_of(pack(layer(h)))
        loss.backward(retain_graph=True)
        loss.backward()
        return x.grad, grads_of(layer.parameters())

    assert_modes_match_plain(layer, step)


@pytest.mark.parametrize("name", ["additive_G_conv", "affine_sigmoid_conv", "checkerboard"])
def test_fused_replay_parameter_gradients_only(name):
    """An input that needs no grad, and autograd.grad for a subset of the parameters."""
    layer, shapes = make(name, logdet=True)
    params = list(layer.parameters())[::2]

    def step():
        torch.manual_seed(2)
        h = torch.randn(shapes[0], dtype=DT) * 1
        with inn.free(h):
            loss = loss_of(pack(layer(h)))
        return torch.autograd.grad(loss, params)

    assert_modes_match_plain(layer, step)


def test_chain_trains_in_float32():
    model = single_chain().float()

    def step():
        torch.manual_seed(3)
        x = torch.randn(2, 2, 4, 4, requires_grad=True)
        zero(model.parameters())
        loss_of(pack(model(x * 1))).backward()
        return x.grad, grads_of(model.parameters())

    assert_modes_match_plain(model, step, rtol=1e-4, atol=1e-5)


def test_check_inverse_in_training_mode_with_dropout_in_both_subnetworks():
    """The inverse runs G before F: check_inverse replays each sub-network's mask through rng_mark."""
    torch.manual_seed(0)
    layer = inn.AdditiveCoupling(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)),
                                 nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    state = torch.get_rng_state()
    assert layer.check_inverse(x)
    assert torch.equal(state, torch.get_rng_state())  # the caller's stream is untouched


def test_invertible_sequential_accumulates_logdets_like_a_hand_loop():
    fresh = glow()
    torch.manual_seed(5)
    x = torch.randn(3, 1, 8, 8, dtype=DT, requires_grad=True)

    loop = copy.deepcopy(fresh)
    z_loop, logdet_loop = run_flow(loop, x * 1)
    nll(z_loop, logdet_loop).backward()
    expected = x.grad.clone(), grads_of(loop.parameters())
    x.grad = None

    chain = inn.InvertibleSequential(*copy.deepcopy(fresh), logdet=True)
    z, logdet = chain(x * 1)
    nll(z, logdet).backward()
    assert_close((z.detach(), logdet.detach()), (z_loop.detach(), logdet_loop.detach()), **TIGHT)
    assert_close((x.grad, grads_of(chain.parameters())), expected, **TIGHT)
    with torch.no_grad():
        assert_close(chain.inverse(z, logdet), x.detach(), **TIGHT)
    chain._reversed = True  # (the catalogue's layers are not reversible; force the flag to test the guard)
    with pytest.raises(invfx.InvfxError, match="reversed"):
        chain(x)


def test_fused_coupling_parameter_hook_fires_once():
    torch.manual_seed(0)
    layer = inn.AdditiveCoupling(nn.Sequential(nn.Linear(3, 3), nn.Tanh())).double()
    calls = []
    handle = layer.F[0].weight.register_hook(lambda g: calls.append(1) or g * 3)
    try:
        x = torch.randn(4, 6, dtype=torch.float64)
        with inn.free():
            layer(x * 1).pow(2).sum().backward()
        got = layer.F[0].weight.grad.clone()
        assert len(calls) == 1
        layer.F[0].weight.grad = None
        with inn.mode(layer, checkpoint=False):
            layer(x * 1).pow(2).sum().backward()
        assert_close(got, layer.F[0].weight.grad)
    finally:
        handle.remove()
