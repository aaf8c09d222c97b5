"""The invertible layer catalogue: couplings, normalisation, 1x1 mixing, permutations and reshapes.

Every layer is an :class:`invfx.nn.Module` with ``function`` and ``inverse`` side by side, so it trains in the
three modes of the base class (plain, checkpoint, invertible) and inverts exactly up to rounding.

log-determinants. With ``logdet=True`` a layer's ``function`` returns ``(*outputs, logdet)``, ``logdet`` of
shape ``(batch,)`` holding ``log|det dy/dx|`` per sample (the batch dimension is dimension 0), and its
``inverse`` takes that trailing ``logdet`` and ignores it (it returns only the inputs). Volume-preserving layers
return zeros. ``InvertibleSequential(*layers, logdet=True)`` turns the flag on in its layers and returns the
sum of their logdets.

Couplings take one tensor (split in two halves along ``dim``, output concatenated) or two tensors (output a
tuple). They replay *fused* in invertible mode: the backward runs each sub-network once, to rebuild the input
and to differentiate at the same time (revlib's cost), instead of once for the inverse and once more for the
recomputation. Sub-networks are arbitrary ``nn.Module``\\ s; dropout inside them replays its forward masks
(:func:`invfx.runtime.rng_mark`) and BatchNorm updates its running statistics once per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvfxError
from ..runtime import ReplayContext, rng_mark
from ..runtime.graft import graft, stand_in
from .module import Module

__all__ = ["AdditiveCoupling", "AffineCoupling", "ActNorm", "InvertibleLinear", "InvertibleConv1x1",
           "Permutation", "Reverse", "Squeeze", "HaarDownsampling", "CheckerboardCoupling"]

_SCALES = ("sigmoid", "exp")


# ----------------------------------------------------------------------------------------------------------
# Helpers


class _Flow(Module):
    """Shared plumbing: the ``logdet`` flag and argument checks."""

    def __init__(self, logdet: bool = False):
        super().__init__()
        self.logdet = bool(logdet)

    def _name(self) -> str:
        return type(self).__name__

    def _error(self, message: str) -> InvfxError:
        return InvfxError(f"{self._name()}: {message}")

    def _with_logdet(self, outputs: tuple, logdet):
        """``outputs`` (and the logdet when asked for), a lone tensor returned bare."""
        if self.logdet:
            return (*outputs, logdet)
        return outputs[0] if len(outputs) == 1 else outputs

    def _strip_logdet(self, outputs: tuple) -> tuple:
        if self.logdet:
            if len(outputs) < 2:
                raise self._error("logdet=True: inverse() takes the outputs followed by the logdet")
            return outputs[:-1]
        return outputs

    @staticmethod
    def _zeros(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0])

    def _rng_name(self, part: str) -> str:
        # unique per instance, so that several couplings can share one region (a whole-chain region)
        return f"{self._name()}@{id(self):x}.{part}"


def _check_dim(layer: str, dim) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim == 0:
        raise InvfxError(f"{layer}: dim must be a non-zero int (dimension 0 is the batch), got {dim!r}")
    return dim


def _check_module(layer: str, what: str, module) -> None:
    if not isinstance(module, nn.Module):
        raise InvfxError(f"{layer}: {what} must be an nn.Module, got {type(module).__name__}")


def _check_scale(layer: str, scale, clamp) -> None:
    if scale not in _SCALES:
        raise InvfxError(f"{layer}: scale must be one of {_SCALES}, got {scale!r}")
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0 or math.isinf(clamp):
        raise InvfxError(f"{layer}: clamp must be a positive finite number, got {clamp!r}")


def _check_count(layer: str, what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvfxError(f"{layer}: {what} must be a positive int, got {value!r}")
    return value


def _scale_of(s_raw: torch.Tensor, kind: str, clamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, log(scale)) from the network's raw output."""
    if kind == "sigmoid":
        shifted = s_raw + 2.0
        return torch.sigmoid(shifted), F.logsigmoid(shifted)
    log_scale = clamp * torch.tanh(s_raw / clamp)
    return torch.exp(log_scale), log_scale


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def _graft(output: torch.Tensor, stand_in: torch.Tensor, attach: torch.Tensor, ctx: ReplayContext):
    """``output``, computed from the leaf ``stand_in``, as a function of ``attach`` (see invfx.runtime.graft)."""
    return graft([output], [stand_in], [attach], list(ctx.params))[0]


_stand_in = stand_in


# ----------------------------------------------------------------------------------------------------------
# Couplings on halves


class _HalvesCoupling(_Flow):
    """One tensor split in two halves along ``dim``, or two tensors."""

    def __init__(self, dim: int, logdet: bool):
        super().__init__(logdet)
        self.dim = _check_dim(self._name(), dim)

    def _split(self, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(first, second, whether the input was one tensor)."""
        if len(inputs) == 1:
            (x,) = inputs
            if x.dim() < 2 or not -x.dim() <= self.dim < x.dim():
                raise self._error(f"dim={self.dim} is out of range for an input of shape {tuple(x.shape)}")
            size = x.shape[self.dim]
            if size % 2:
                raise self._error(f"cannot halve an input of shape {tuple(x.shape)}: its size {size} along "
                                  f"dim={self.dim} is odd (pass two tensors for unequal halves)")
            a, b = x.chunk(2, self.dim)
            return a, b, True
        if len(inputs) == 2:
            return inputs[0], inputs[1], False
        raise self._error(f"takes one tensor (split in halves) or two tensors, got {len(inputs)} inputs")

    def _join(self, a, b, single: bool) -> tuple:
        return (torch.cat([a, b], self.dim),) if single else (a, b)

    def _check_shape(self, what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
        if got.shape != expected.shape:
            raise self._error(f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")

    def replay(self, ctx: ReplayContext):
        """Fused: with every input still in memory, plainly recompute; else rebuild from the output halves,
        each sub-network run once (``_replay_halves``)."""
        outputs = self._strip_logdet(ctx.outputs)
        if all(p in ctx.saved for p in range(len(outputs))):
            return self.function(*(ctx.input(p) for p in range(len(outputs))))
        y1, y2, _ = self._split(outputs)
        return self._replay_halves(ctx, y1, y2, len(outputs) == 1)

    def _replay_halves(self, ctx: ReplayContext, y1, y2, single: bool):
        raise NotImplementedError


class AdditiveCoupling(_HalvesCoupling):
    """Additive coupling (NICE; RevNet with ``G``), volume preserving::

        y1 = x1 + F(x2)
        y2 = x2 + G(y1)          (y2 = x2 without G)

        x2 = y2 - G(y1)
        x1 = y1 - F(x2)

    ``x`` is one tensor split in halves along ``dim`` (returns ``cat([y1, y2], dim)``) or two tensors
    ``(x1, x2)`` (returns ``(y1, y2)``). ``F`` maps x2-shaped tensors to x1-shaped ones, ``G`` the other way;
    both are arbitrary modules (dropout, BatchNorm). The logdet is 0.

    Fused replay: in invertible mode the backward runs ``F`` and ``G`` once each (forward: once each).
    """

    def __init__(self, F: nn.Module, G: nn.Module | None = None, dim: int = 1, logdet: bool = False):
        super().__init__(dim, logdet)
        _check_module("AdditiveCoupling", "F", F)
        if G is not None:
            _check_module("AdditiveCoupling", "G", G)
        self.F = F
        self.G = G

    def _run_F(self, x2, like):
        rng_mark(self._rng_name("F"))
        f = self.F(x2)
        self._check_shape("F(x2)", f, like)
        return f

    def _run_G(self, y1, like):
        rng_mark(self._rng_name("G"))
        g = self.G(y1)
        self._check_shape("G(y1)", g, like)
        return g

    def function(self, *inputs, strict=None):
        x1, x2, single = self._split(inputs)
        y1 = x1 + self._run_F(x2, x1)
        y2 = x2 + self._run_G(y1, x2) if self.G is not None else x2
        return self._with_logdet(self._join(y1, y2, single), self._zeros(x1))

    def inverse(self, *outputs, saved=()):
        y1, y2, single = self._split(self._strip_logdet(outputs))
        x2 = y2 - self._run_G(y1, y2) if self.G is not None else y2
        x1 = y1 - self._run_F(x2, y1)
        joined = self._join(x1, x2, single)
        return joined[0] if single else joined

    def _replay_halves(self, ctx: ReplayContext, y1, y2, single: bool):
        if self.G is not None:
            y1_stand_in = _stand_in(y1)
            g = self._run_G(y1_stand_in, y2)
            x2_value = y2 - g.detach()
        else:
            x2_value = y2
        if single:
            x2_stand_in = _stand_in(x2_value)
            f = self._run_F(x2_stand_in, y1)
            x = ctx.input(0, torch.cat([y1 - f.detach(), x2_value], self.dim))
            x1, x2 = x.chunk(2, self.dim)
            f = _graft(f, x2_stand_in, x2, ctx)
        else:
            x2 = ctx.input(1, x2_value)
            f = self._run_F(x2, y1)
            x1 = ctx.input(0, y1 - f.detach())
        new_y1 = x1 + f
        new_y2 = x2 + _graft(g, y1_stand_in, new_y1, ctx) if self.G is not None else x2
        return self._with_logdet(self._join(new_y1, new_y2, single), self._zeros(x1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, logdet={self.logdet}, " + super().extra_repr()


class AffineCoupling(_HalvesCoupling):
    """Affine coupling (RealNVP / Glow)::

        s_raw, t = net(x2).chunk(2, dim)
        scale = sigmoid(s_raw + 2)                       (scale="sigmoid", Glow)
              | exp(clamp * tanh(s_raw / clamp))         (scale="exp", soft-clamped)
        y1 = x1 * scale + t
        y2 = x2

        x1 = (y1 - t) / scale      (s_raw, t = net(y2).chunk(2, dim))
        x2 = y2

        log|det J| = sum of log(scale) over each sample

    One tensor (halves along ``dim``) or two tensors, as :class:`AdditiveCoupling`. ``net`` maps x2-shaped
    tensors to tensors twice x1's size along ``dim``.

    Fused replay: in invertible mode the backward runs ``net`` once (forward: once).
    """

    def __init__(self, net: nn.Module, dim: int = 1, scale: str = "sigmoid", clamp: float = 2.0,
                 logdet: bool = False):
        super().__init__(dim, logdet)
        _check_module("AffineCoupling", "net", net)
        _check_scale("AffineCoupling", scale, clamp)
        self.net = net
        self.scale = scale
        self.clamp = float(clamp)

    def _parameters_of(self, x2, x1):
        """(scale, log scale, shift) from ``net(x2)``, checked against ``x1``'s shape."""
        rng_mark(self._rng_name("net"))
        return self._split_net(self.net(x2), x1)

    def _split_net(self, h, x1):
        if h.dim() != x1.dim() or h.shape[self.dim] % 2:
            raise self._error(f"net output of shape {tuple(h.shape)} cannot be split into (s, t) along "
                              f"dim={self.dim}")
        s_raw, t = h.chunk(2, self.dim)
        self._check_shape("s and t (halves of net's output)", s_raw, x1)
        scale, log_scale = _scale_of(s_raw, self.scale, self.clamp)
        return scale, log_scale, t

    def function(self, *inputs, strict=None):
        x1, x2, single = self._split(inputs)
        scale, log_scale, t = self._parameters_of(x2, x1)
        y1 = x1 * scale + t
        return self._with_logdet(self._join(y1, x2, single), _per_sample_sum(log_scale))

    def inverse(self, *outputs, saved=()):
        y1, y2, single = self._split(self._strip_logdet(outputs))
        scale, _, t = self._parameters_of(y2, y1)
        joined = self._join((y1 - t) / scale, y2, single)
        return joined[0] if single else joined

    def _replay_halves(self, ctx: ReplayContext, y1, y2, single: bool):
        if single:
            x2_stand_in = _stand_in(y2)
            rng_mark(self._rng_name("net"))
            h = self.net(x2_stand_in)
            scale, _, t = self._split_net(h.detach(), y1)
            x = ctx.input(0, torch.cat([(y1 - t) / scale, y2], self.dim))
            x1, x2 = x.chunk(2, self.dim)
            scale, log_scale, t = self._split_net(_graft(h, x2_stand_in, x2, ctx), y1)
        else:
            x2 = ctx.input(1, y2)
            scale, log_scale, t = self._parameters_of(x2, y1)
            x1 = ctx.input(0, (y1 - t.detach()) / scale.detach())
        new_y1 = x1 * scale + t
        return self._with_logdet(self._join(new_y1, x2, single), _per_sample_sum(log_scale))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, scale={self.scale!r}, clamp={self.clamp}, logdet={self.logdet}, "
                + super().extra_repr())


class CheckerboardCoupling(_Flow):
    """RealNVP masked affine coupling on one tensor ``(N, C, H, W)``::

        b = mask (1: passed through, 0: transformed)
            "checkerboard": b[h, w] = (h + w + parity) % 2 == 0, over H and W
            "channel":      b[c] = c < C/2 (parity=0) or c >= C/2 (parity=1)
        s_raw, t = net(b * x).chunk(2, dim=1)
        scale = sigmoid(s_raw + 2) | exp(clamp * tanh(s_raw / clamp))
        y = b * x + (1 - b) * (x * scale + t)

        x = b * y + (1 - b) * (y - t) / scale      (s_raw, t = net(b * y).chunk(2, dim=1); b * y == b * x)

        log|det J| = sum over the (1 - b) positions of log(scale)

    ``net`` maps ``(N, C, H, W)`` to ``(N, 2C, H, W)``. Fused replay: in invertible mode the backward runs
    ``net`` once (forward: once).
    """

    def __init__(self, net: nn.Module, mask: str = "checkerboard", parity: int = 0, scale: str = "sigmoid",
                 clamp: float = 2.0, logdet: bool = False):
        super().__init__(logdet)
        _check_module("CheckerboardCoupling", "net", net)
        if mask not in ("checkerboard", "channel"):
            raise InvfxError(f"CheckerboardCoupling: mask must be 'checkerboard' or 'channel', got {mask!r}")
        if isinstance(parity, bool) or parity not in (0, 1):
            raise InvfxError(f"CheckerboardCoupling: parity must be 0 or 1, got {parity!r}")
        _check_scale("CheckerboardCoupling", scale, clamp)
        self.net = net
        self.mask = mask
        self.parity = int(parity)
        self.scale = scale
        self.clamp = float(clamp)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise self._error(f"expects (N, C, H, W) inputs, got shape {tuple(x.shape)}")
        if self.mask == "checkerboard":
            h, w = x.shape[2:]
            rows = torch.arange(h, device=x.device)[:, None]
            cols = torch.arange(w, device=x.device)[None, :]
            return ((rows + cols + self.parity) % 2 == 0).to(x.dtype)[None, None]
        channels = x.shape[1]
        if channels % 2:
            raise self._error(f"mask='channel' cannot halve {channels} channels (input shape {tuple(x.shape)})")
        keep = (torch.arange(channels, device=x.device) < channels // 2) != bool(self.parity)
        return keep.to(x.dtype).view(1, channels, 1, 1)

    def _split_net(self, h, x):
        if h.shape != (x.shape[0], 2 * x.shape[1], *x.shape[2:]):
            raise self._error(f"net output has shape {tuple(h.shape)}, expected "
                              f"{(x.shape[0], 2 * x.shape[1], *x.shape[2:])} for an input of shape {tuple(x.shape)}")
        s_raw, t = h.chunk(2, 1)
        scale, log_scale = _scale_of(s_raw, self.scale, self.clamp)
        return scale, log_scale, t

    def _run_net(self, masked):
        rng_mark(self._rng_name("net"))
        return self.net(masked)

    def _outputs(self, x, b, masked, h):
        scale, log_scale, t = self._split_net(h, x)
        y = masked + (1 - b) * (x * scale + t)
        return self._with_logdet((y,), _per_sample_sum((1 - b) * log_scale))

    def function(self, x, strict=None):
        b = self._mask(x)
        masked = b * x
        return self._outputs(x, b, masked, self._run_net(masked))

    def _rebuild(self, y, b, h):
        scale, _, t = self._split_net(h, y)
        return b * y + (1 - b) * ((y - t) / scale)

    def inverse(self, *outputs, saved=()):
        (y,) = self._strip_logdet(outputs)
        b = self._mask(y)
        return self._rebuild(y, b, self._run_net(b * y))

    def replay(self, ctx: ReplayContext):
        if 0 in ctx.saved:
            return self.function(ctx.input(0))
        (y,) = self._strip_logdet(ctx.outputs)
        b = self._mask(y)
        masked_stand_in = _stand_in(b * y)
        h = self._run_net(masked_stand_in)
        x = ctx.input(0, self._rebuild(y, b, h.detach()))
        masked = b * x
        return self._outputs(x, b, masked, _graft(h, masked_stand_in, masked, ctx))

    def extra_repr(self) -> str:
        return (f"mask={self.mask!r}, parity={self.parity}, scale={self.scale!r}, clamp={self.clamp}, "
                f"logdet={self.logdet}, " + super().extra_repr())


# ----------------------------------------------------------------------------------------------------------
# Normalisation and mixing


def _channel_view(layer: _Flow, x: torch.Tensor, dim: int, features: int) -> list[int]:
    """Shape that broadcasts a per-channel vector along ``dim`` of ``x``; checks the channel count."""
    if x.dim() < 2 or not -x.dim() <= dim < x.dim():
        raise layer._error(f"dim={dim} is out of range for an input of shape {tuple(x.shape)}")
    if x.shape[dim] != features:
        raise layer._error(f"expects {features} features along dim={dim}, got an input of shape {tuple(x.shape)}")
    shape = [1] * x.dim()
    shape[dim] = features
    return shape


class ActNorm(_Flow):
    """Activation normalisation (Glow): a per-channel affine map::

        y = (x + loc) * exp(logs)
        x = y * exp(-logs) - loc
        log|det J| = (positions per channel) * sum(logs)

    Data-dependent initialisation: the first forward in training mode sets ``loc = -mean`` and
    ``logs = -log(std + eps)`` of that batch per channel (so its output has zero mean and unit variance), and
    records it in the ``initialized`` buffer (saved in the ``state_dict``, so a loaded model is not re-initialised).
    """

    def __init__(self, num_features: int, dim: int = 1, eps: float = 1e-6, logdet: bool = False):
        super().__init__(logdet)
        self.num_features = _check_count("ActNorm", "num_features", num_features)
        self.dim = _check_dim("ActNorm", dim)
        self.eps = float(eps)
        self.loc = nn.Parameter(torch.zeros(num_features))
        self.logs = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))
        self._seen_initialized = False  # caches ``initialized`` (reading a CUDA buffer every forward syncs)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._seen_initialized = False

    def _needs_init(self) -> bool:
        if not self.training or self._seen_initialized:
            return False
        self._seen_initialized = bool(self.initialized)
        return not self._seen_initialized

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set ``loc`` and ``logs`` from the batch ``x`` (done automatically on the first training forward)."""
        dims = [d for d in range(x.dim()) if d != self.dim % x.dim()]
        mean = x.mean(dims)
        std = x.std(dims, unbiased=False)
        self.loc.copy_(-mean)
        self.logs.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)
        self._seen_initialized = True

    def _logdet(self, x):
        positions = x.numel() // (x.shape[0] * self.num_features) if x.numel() else 0
        return x.new_ones(x.shape[0]) * (positions * self.logs.sum())

    def function(self, x, strict=None):
        shape = _channel_view(self, x, self.dim, self.num_features)
        if self._needs_init():
            self.initialize(x)
        y = (x + self.loc.view(shape)) * torch.exp(self.logs).view(shape)
        return self._with_logdet((y,), self._logdet(x))

    def inverse(self, *outputs, saved=()):
        (y,) = self._strip_logdet(outputs)
        shape = _channel_view(self, y, self.dim, self.num_features)
        return y * torch.exp(-self.logs).view(shape) - self.loc.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dim={self.dim}, logdet={self.logdet}, " + super().extra_repr()


class _LUMixing(_Flow):
    """An invertible matrix in LU form, ``W = P @ L @ (U + diag(sign * exp(log_abs_s)))``."""

    def __init__(self, features: int, logdet: bool):
        super().__init__(logdet)
        n = features
        q, _ = torch.linalg.qr(torch.randn(n, n))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(n, n), -1))
        self.register_buffer("upper_mask", torch.triu(torch.ones(n, n), 1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(upper * self.upper_mask)
        self.log_abs_s = nn.Parameter(torch.log(torch.abs(s)))

    def _factors(self):
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.upper_mask + torch.diag(self.sign * torch.exp(self.log_abs_s))
        return lower, upper

    def weight(self) -> torch.Tensor:
        """``W`` (features x features)."""
        lower, upper = self._factors()
        return self.permutation @ lower @ upper

    def _solve_rows(self, y2d: torch.Tensor) -> torch.Tensor:
        """``x`` with ``x @ W.T == y`` for rows ``y``: ``x U^T L^T P^T = y`` by two triangular solves."""
        lower, upper = self._factors()
        b = y2d @ self.permutation
        c = torch.linalg.solve_triangular(lower.T, b, upper=True, left=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper.T, c, upper=False, left=False)


class InvertibleLinear(_LUMixing):
    """Invertible linear map on the last dimension, LU-parametrised (Glow)::

        W = P @ L @ (U + diag(sign * exp(log_abs_s)))
        y = x @ W.T
        x = y @ W^-T            (two triangular solves, no general inverse)
        log|det J| = (positions) * sum(log_abs_s)

    ``P`` is a fixed permutation, ``L`` unit lower-triangular and ``U`` strictly upper-triangular (masked
    parameters), ``sign`` fixed; initialised from a random orthogonal matrix. Inputs are ``(N, ..., features)``;
    ``positions`` is the number of feature vectors per sample.
    """

    def __init__(self, features: int, logdet: bool = False):
        _check_count("InvertibleLinear", "features", features)
        super().__init__(features, logdet)
        self.features = features

    def _check(self, x):
        if x.dim() < 2 or x.shape[-1] != self.features:
            raise self._error(f"expects (N, ..., {self.features}) inputs, got shape {tuple(x.shape)}")

    def _logdet(self, x):
        positions = x[0].numel() // self.features
        return x.new_ones(x.shape[0]) * (positions * self.log_abs_s.sum())

    def function(self, x, strict=None):
        self._check(x)
        return self._with_logdet((F.linear(x, self.weight()),), self._logdet(x))

    def inverse(self, *outputs, saved=()):
        (y,) = self._strip_logdet(outputs)
        self._check(y)
        return self._solve_rows(y.reshape(-1, self.features)).reshape(y.shape)

    def extra_repr(self) -> str:
        return f"{self.features}, logdet={self.logdet}, " + super().extra_repr()


class InvertibleConv1x1(_LUMixing):
    """Invertible 1x1 convolution on ``(N, C, H, W)`` (Glow), LU-parametrised as :class:`InvertibleLinear`::

        y[n, :, h, w] = W @ x[n, :, h, w]
        x[n, :, h, w] = W^-1 @ y[n, :, h, w]     (two triangular solves)
        log|det J| = H * W * sum(log_abs_s)
    """

    def __init__(self, channels: int, logdet: bool = False):
        _check_count("InvertibleConv1x1", "channels", channels)
        super().__init__(channels, logdet)
        self.channels = channels

    def _check(self, x):
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise self._error(f"expects (N, {self.channels}, H, W) inputs, got shape {tuple(x.shape)}")

    def function(self, x, strict=None):
        self._check(x)
        y = F.conv2d(x, self.weight()[:, :, None, None])
        logdet = x.new_ones(x.shape[0]) * (x.shape[2] * x.shape[3] * self.log_abs_s.sum())
        return self._with_logdet((y,), logdet)

    def inverse(self, *outputs, saved=()):
        (y,) = self._strip_logdet(outputs)
        self._check(y)
        rows = y.movedim(1, -1)
        x = self._solve_rows(rows.reshape(-1, self.channels)).reshape(rows.shape)
        return x.movedim(-1, 1).contiguous()

    def extra_repr(self) -> str:
        return f"{self.channels}, logdet={self.logdet}, " + super().extra_repr()


# ----------------------------------------------------------------------------------------------------------
# Permutations and reshapes (volume preserving: logdet 0)


class Permutation(_Flow):
    """A fixed random permutation of the features along ``dim``::

        y = x.index_select(dim, perm)
        x = y.index_select(dim, argsort(perm))
        log|det J| = 0

    ``perm`` is a buffer drawn at construction, from ``torch.Generator().manual_seed(seed)`` if ``seed`` is given,
    otherwise from the global RNG.
    """

    def __init__(self, num_features: int, dim: int = 1, seed: int | None = None, logdet: bool = False):
        super().__init__(logdet)
        self.num_features = _check_count("Permutation", "num_features", num_features)
        self.dim = _check_dim("Permutation", dim)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvfxError(f"Permutation: seed must be an int or None, got {seed!r}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        perm = torch.randperm(num_features, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def function(self, x, strict=None):
        _channel_view(self, x, self.dim, self.num_features)
        return self._with_logdet((x.index_select(self.dim, self.perm),), self._zeros(x))

    def inverse(self, *outputs, saved=()):
        (y,) = self._strip_logdet(outputs)
        _channel_view(self, y, self.dim, self.num_features)
        return y.index_select(self.dim, self.inverse_perm)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dim={self.dim}, logdet={self.logdet}, " + super().extra_repr()


class Reverse(_Flow):
    """Reverse the order of the features along ``dim`` (RealNVP's channel reversal)::

        y = x.flip(dim);  x = y.flip(dim);  log|det J| = 0
    """

    def __init__(self, dim: int = 1, logdet: bool = False):
        super().__init__(logdet)
        self.dim = _check_dim("Reverse", dim)

    def _check(self, x):
        if x.dim() < 2 or not -x.dim() <= self.dim < x.dim():
            raise self._error(f"dim={self.dim} is out of range for an input of shape {tuple(x.shape)}")

    def function(self, x, strict=None):
        self._check(x)
        return self._with_logdet((x.flip(self.dim),), self._zeros(x))

    def inverse(self, *outputs, saved=()):
        (y,) = self._strip_logdet(outputs)
        self._check(y)
        return y.flip(self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, logdet={self.logdet}, " + super().extra_repr()


def _check_spatial(layer: _Flow, x: torch.Tensor, factor: int) -> None:
    if x.dim() != 4:
        raise layer._error(f"expects (N, C, H, W) inputs, got shape {tuple(x.shape)}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise layer._error(f"spatial size {tuple(x.shape[2:])} of an input of shape {tuple(x.shape)} is not "
                           f"divisible by {factor}")


def _check_depth(layer: _Flow, y: torch.Tensor, groups: int) -> None:
    if y.dim() != 4 or y.shape[1] % groups:
        raise layer._error(f"inverse expects (N, C, H, W) with C divisible by {groups}, got shape {tuple(y.shape)}")


class Squeeze(_Flow):
    """Space to depth (RealNVP / Glow squeeze): ``(N, C, H, W) -> (N, C f^2, H/f, W/f)``::

        y = pixel_unshuffle(x, f);  x = pixel_shuffle(y, f);  log|det J| = 0

    Output channel ``c * f^2 + i * f + j`` holds ``x[:, c, i::f, j::f]``.
    """

    def __init__(self, factor: int = 2, logdet: bool = False):
        super().__init__(logdet)
        self.factor = _check_count("Squeeze", "factor", factor)

    def function(self, x, strict=None):
        _check_spatial(self, x, self.factor)
        return self._with_logdet((F.pixel_unshuffle(x, self.factor),), self._zeros(x))

    def inverse(self, *outputs, saved=()):
        (y,) = self._strip_logdet(outputs)
        _check_depth(self, y, self.factor ** 2)
        return F.pixel_shuffle(y, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, logdet={self.logdet}, " + super().extra_repr()


class HaarDownsampling(_Flow):
    """Orthonormal 2x2 Haar wavelet transform: ``(N, C, H, W) -> (N, 4C, H/2, W/2)``.

    For each 2x2 block ``[[a, b], [c, d]]`` of a channel::

        average    = (a + b + c + d) / 2
        horizontal = (a - b + c - d) / 2
        vertical   = (a + b - c - d) / 2
        diagonal   = (a - b - c + d) / 2

    The output is ordered by band: channels ``[0, C)`` are the averages (a half-resolution image, times 2),
    then the horizontal, vertical and diagonal details. The matrix is orthonormal and symmetric, so it is its
    own inverse and ``log|det J| = 0``.
    """

    def __init__(self, logdet: bool = False):
        super().__init__(logdet)
        h = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                          [1.0, -1.0, 1.0, -1.0],
                          [1.0, 1.0, -1.0, -1.0],
                          [1.0, -1.0, -1.0, 1.0]]) / 2
        self.register_buffer("haar", h, persistent=False)

    def _mix(self, blocks):
        return torch.einsum("ij,ncjhw->ncihw", self.haar.to(blocks.dtype), blocks)

    def function(self, x, strict=None):
        _check_spatial(self, x, 2)
        n, c, height, width = x.shape
        blocks = F.pixel_unshuffle(x, 2).reshape(n, c, 4, height // 2, width // 2)  # (a, b, c, d) per channel
        bands = self._mix(blocks).transpose(1, 2).reshape(n, 4 * c, height // 2, width // 2)
        return self._with_logdet((bands,), self._zeros(x))

    def inverse(self, *outputs, saved=()):
        (y,) = self._strip_logdet(outputs)
        _check_depth(self, y, 4)
        n, c4, h, w = y.shape
        bands = y.reshape(n, 4, c4 // 4, h, w).transpose(1, 2)
        blocks = self._mix(bands).reshape(n, c4, h, w)
        return F.pixel_shuffle(blocks, 2)

    def extra_repr(self) -> str:
        return f"logdet={self.logdet}, " + super().extra_repr()
