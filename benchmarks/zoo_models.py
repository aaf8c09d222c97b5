"""Models of the libraries users train with (issue 18), built as their users build them, for ``benchmarks/zoo.py``
and the zoo tests. Each builder returns ``(model, example_input)``: the model unmodified (no invfx in it), in
train mode, and a batch to optimize and measure it on.

FrEIA (``freia`` 0.2): a ``SequenceINN`` of coupling blocks around small sub-networks, called as ``z, log_det =
model(x)``. The sub-networks' last layer is scaled down (``subnet_gain``), as FrEIA's examples start a flow near
the identity (they zero it): with PyTorch's default initialisation a Glow coupling's inverse amplifies the rounding
of the rebuilt values by about 3 per block, and no plan could rebuild 32 of them within float32's tolerance (the
plan then inverts shorter runs of blocks; nothing trains wrong either way). A loss that reads the log-det, as a
flow's negative log-likelihood does: :func:`freia_nll`.

Imports go through ``model_libraries.import_library`` (the library missing raises ``ModuleNotFoundError``, which
says which one and how to install it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # (the benchmarks import each other)
from model_libraries import import_library  # noqa: E402

__all__ = ["freia_glow", "freia_allinone", "freia_nll"]


def _library(name: str):
    """``name`` imported as benchmarks/model_libraries.py imports it (torchvision made importable on CPU torch)."""
    module = import_library(name)
    if module is None:
        raise ModuleNotFoundError(f"{name} is not installed (pip install -c constraints.txt -e '.[models]')")
    return module


def _scaled(subnet: nn.Sequential, gain: float) -> nn.Sequential:
    with torch.no_grad():
        subnet[-1].weight.mul_(gain)
        subnet[-1].bias.mul_(gain)
    return subnet


def _conv_subnet(hidden: int, gain: float):
    """FrEIA's usual image sub-network: 3x3 convolution, ReLU, 3x3 convolution."""
    def make(channels_in: int, channels_out: int) -> nn.Module:
        return _scaled(nn.Sequential(nn.Conv2d(channels_in, hidden, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(hidden, channels_out, 3, padding=1)), gain)
    return make


def _mlp_subnet(hidden: int, gain: float):
    """FrEIA's usual vector sub-network: linear, ReLU, linear."""
    def make(features_in: int, features_out: int) -> nn.Module:
        return _scaled(nn.Sequential(nn.Linear(features_in, hidden), nn.ReLU(), nn.Linear(hidden, features_out)),
                       gain)
    return make


def _sequence(block: str, depth: int, image: bool, *, batch: int, channels: int, size: int, features: int,
              hidden: int, subnet_gain: float, dtype: torch.dtype, seed: int, **options):
    framework, modules = _library("FrEIA.framework"), _library("FrEIA.modules")
    torch.manual_seed(seed)
    sys.modules["numpy"].random.seed(seed)  # (FrEIA draws its permutations with NumPy, which it imports)
    dims = (channels, size, size) if image else (features,)
    model = framework.SequenceINN(*dims)
    subnet = _conv_subnet(hidden, subnet_gain) if image else _mlp_subnet(hidden, subnet_gain)
    for _ in range(depth):
        model.append(getattr(modules, block), subnet_constructor=subnet, **options)
    x = torch.randn(batch, *dims)
    return model.to(dtype).train(), x.to(dtype)


def freia_glow(depth: int, image: bool = True, *, batch: int | None = None, channels: int = 4, size: int = 16,
               features: int = 16, hidden: int | None = None, clamp: float = 2.0, subnet_gain: float = 0.2,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``depth`` ``GLOWCouplingBlock``\\ s (soft-clamped affine couplings, each half scaled and shifted by a
    sub-network of the other): on ``batch`` x ``channels`` x ``size`` x ``size`` images with conv sub-networks of
    ``hidden`` channels (defaults 16 and 32), or on ``batch`` x ``features`` vectors with MLP sub-networks of
    ``hidden`` units (defaults 256 and 128)."""
    return _sequence("GLOWCouplingBlock", depth, image, batch=batch or (16 if image else 256), channels=channels,
                     size=size, features=features, hidden=hidden or (32 if image else 128),
                     subnet_gain=subnet_gain, dtype=dtype, seed=seed, clamp=clamp)


def freia_allinone(depth: int, image: bool = False, *, batch: int | None = None, channels: int = 4, size: int = 16,
                   features: int = 16, hidden: int | None = None, affine_clamping: float = 2.0,
                   permute_soft: bool = False, subnet_gain: float = 0.2, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``depth`` ``AllInOneBlock``\\ s (an affine coupling, a global affine scaling through softplus, and a fixed
    permutation applied as a linear map or 1x1 convolution): on ``batch`` x ``features`` vectors with MLP
    sub-networks (defaults 256 and 128 hidden units), or with ``image`` on ``batch`` x ``channels`` x ``size`` x
    ``size`` images with conv sub-networks (defaults 16 and 32 channels)."""
    return _sequence("AllInOneBlock", depth, image, batch=batch or (16 if image else 256), channels=channels,
                     size=size, features=features, hidden=hidden or (32 if image else 128),
                     subnet_gain=subnet_gain, dtype=dtype, seed=seed, affine_clamping=affine_clamping,
                     permute_soft=permute_soft)


def freia_nll(output) -> torch.Tensor:
    """A flow's negative log-likelihood under a standard normal, up to a constant: ``z.pow(2).sum() / 2 -
    log_det.sum()`` for ``output = (z, log_det)`` (a loss for ``invfx.measure(..., loss=freia_nll)``)."""
    z, log_det = output
    return z.pow(2).sum() / 2 - log_det.sum()
