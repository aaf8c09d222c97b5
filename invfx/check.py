"""The last line of defence: one training step of the optimized module against plain autograd.

A memory optimizer that trains wrong is worse than none. Every unit test compares the passes with plain autograd,
but a user's model is not a unit test: before :func:`invfx.optimize` returns, it runs one training step of the
optimized module and one of the model itself on the example inputs, with the same weights and the same random
numbers, and compares every output, every parameter gradient and the inputs' gradients. Both run on a deep copy
(the caller's model, its gradients, buffers and RNG are left as they were), in float64 where a copy fits in
memory and the model runs in float64, so that a difference is the optimizer's and not rounding. A plan whose
gradients differ is refused with :class:`GradientCheckError`, naming the region (and so the segments) that makes
the difference.

Cost: a deep copy of the model and two training steps at the example's size (more only when the check fails);
``check_gradients=False`` skips it.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InvfxError, first_line
from .modes import Mode
from .regions.fused import tensors_in
from .runtime.region import relative_error
from .tolerances import TOLERANCES

__all__ = ["GradientCheckError", "GradientCheck", "check_gradients"]



class GradientCheckError(InvfxError):
    """The optimized module's gradients differ from plain autograd's on the example inputs."""


@dataclass
class GradientCheck:
    dtype: torch.dtype  # what the check ran in
    worst: float  # the largest relative difference seen
    where: str  # of which tensor
    seconds: float
    compared: int  # how many tensors were compared

    def to_dict(self) -> dict:
        return {"dtype": str(self.dtype).replace("torch.", ""), "worst_relative_error": self.worst,
                "worst_at": self.where, "seconds": self.seconds, "tensors_compared": self.compared}

    def __str__(self) -> str:
        return (f"gradient check: one training step on the example inputs ({str(self.dtype).replace('torch.', '')}) "
                f"matches plain autograd to {self.worst:.1e} relative over {self.compared} tensors "
                f"({self.seconds:.2f} s; check_gradients=False skips it)")


def check_gradients(model: nn.Module, optimized: nn.Module, inputs: tuple, regions: dict[str, list[str]]
                    ) -> GradientCheck | None:
    """Compare one training step of ``optimized`` with one of ``model`` on ``inputs`` (see the module's
    docstring). ``regions``: the region names to blame, each with the segments it runs. Returns what was
    compared, None when there is nothing to compare (no floating input or parameter takes a gradient), and raises
    :class:`GradientCheckError` when a difference exceeds :data:`invfx.tolerances.TOLERANCES` (``gradients``)."""
    start = time.perf_counter()
    dtype = _working_dtype(model, inputs)
    devices = sorted({x.device.index or 0 for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            twin_model, twin, inputs, params, expected = _twins(model, optimized, inputs, dtype)
        except Exception:  # noqa: BLE001 - a model written for its own dtype (``h.float()``) fails in float64
            if dtype is None:
                raise
            dtype = None
            twin_model, twin, inputs, params, expected = _twins(model, optimized, inputs, dtype)
        if expected is None:
            return None
        got = _step(twin, inputs, params)
        names = [n for n, p in twin_model.named_parameters() if p.requires_grad]
        differences = _differences(got, expected, names)
        found = TOLERANCES.get(dtype or _dtype_of(model, inputs))
        tolerance = found.gradients if found is not None else TOLERANCES[torch.float32].gradients
        worst, where = _worst(differences)
        if not worst <= tolerance:  # (NaN too)
            raise GradientCheckError(_blame(twin, twin_model, inputs, params, names, regions, tolerance, worst,
                                            where, dtype or _dtype_of(model, inputs)))
    return GradientCheck(dtype or _dtype_of(model, inputs), worst, where, time.perf_counter() - start,
                         len(differences))


def _uncopyable(model: nn.Module) -> str:
    """``module 'blocks.0' (AllInOneBlock) holds w_perm, a tensor computed with grad (not a parameter or buffer):
    `` for the first module attribute that stops a deep copy, or ""."""
    for name, module in model.named_modules():
        for field, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                return (f"module {name or '(the model)'!r} ({type(module).__name__}) holds {field}, a tensor its "
                        "forward computed with grad (not a parameter or buffer): ")
    return ""


def _twins(model: nn.Module, optimized: nn.Module, inputs: tuple, dtype: torch.dtype | None):
    """Deep copies of both modules (in ``dtype``, if given), the inputs to give them, the parameters that take a
    gradient, and the plain copy's step."""
    try:
        twin_model, twin = copy.deepcopy((model, optimized))
    except RuntimeError as error:  # (torch refuses to copy a tensor computed with grad: not a graph leaf)
        raise InvfxError(f"invfx.optimize: the gradient check cannot copy the model: {_uncopyable(model)}"
                         f"{first_line(error)}; pass check_gradients=False to skip the check") from error
    if dtype is not None:
        twin_model.to(dtype)  # (twin shares twin_model's parameters: converted with them, in place)
        twin.to(dtype)  # (but buffers are replaced, not converted in place: twin's own references, its regions')
        inputs = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    twin_model.train()
    twin.train()
    params = [p for p in twin_model.parameters() if p.requires_grad]
    return twin_model, twin, inputs, params, _step(twin_model, inputs, params)


def _dtype_of(model: nn.Module, inputs: tuple) -> torch.dtype:
    for tensor in [*model.parameters(), *(x for x in inputs if isinstance(x, torch.Tensor))]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _working_dtype(model: nn.Module, inputs: tuple) -> torch.dtype | None:
    """float64 when a float64 copy of the model, its gradients and a few times the inputs fit in half the free
    memory of their device; None (the model's own dtype) otherwise, or when the model does not run in float64."""
    tensors = [*model.parameters(), *model.buffers(), *(x for x in inputs if isinstance(x, torch.Tensor))]
    floating = [t for t in tensors if t.is_floating_point()]
    if not floating or all(t.dtype == torch.float64 for t in floating):
        return None
    need = sum(t.numel() * 8 for t in floating) * 4
    device = floating[0].device
    try:
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None
    return torch.float64 if need <= free // 2 else None


def _step(module: nn.Module, inputs: tuple, params: list[torch.Tensor]):
    """Outputs, the floating inputs' gradients and ``params``' gradients of one step whose loss weighs each
    tensor output by fixed random numbers (every output gets a gradient of its own)."""
    for p in params:
        p.grad = None
    leaves = [x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
              for x in inputs]
    torch.manual_seed(0)
    out = module(*leaves)
    outputs = [o for o in tensors_in(out) if o.requires_grad]
    if not outputs:
        return None
    weights = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=weights, dtype=o.dtype).to(o.device)).sum() for o in outputs)
    loss.backward()
    return ([o.detach() for o in outputs], [x.grad for x in leaves if isinstance(x, torch.Tensor)],
            [p.grad for p in params])


#: a tensor is compared against at least this fraction of the largest tensor of its kind (outputs, gradients):
#: a gradient that is zero but for rounding (a bias before BatchNorm) differs by rounding only, relatively by 1
FLOOR = 1e-3


def _differences(got, expected, names: list[str]) -> list[tuple[float, str]]:
    """(relative difference, what) for each tensor; inf where one side has a gradient and the other none."""
    found = []
    largest = {kind: max((_largest(b) for b in expected[kind] if b is not None), default=0.0) for kind in (0, 1, 2)}
    largest[1] = largest[2] = max(largest[1], largest[2])  # (gradients of inputs and parameters together)
    labelled = [(0, f"output {i}", a, b) for i, (a, b) in enumerate(zip(got[0], expected[0]))]
    labelled += [(1, f"gradient of input {i}", a, b) for i, (a, b) in enumerate(zip(got[1], expected[1]))]
    labelled += [(2, f"gradient of {name}", a, b) for name, a, b in zip(names, got[2], expected[2])]
    if len(got[0]) != len(expected[0]):
        found.append((float("inf"), "the number of outputs that take a gradient"))
    for kind, what, a, b in labelled:
        if a is None and b is None:
            continue
        if (a is None) != (b is None):
            found.append((float("inf"), f"{what} ({'none' if a is None else 'one'} where plain autograd has "
                                        f"{'none' if b is None else 'one'})"))
            continue
        if b.numel():
            found.append((relative_error(a, b, FLOOR * largest[kind]), what))
    return found


def _worst(differences: list[tuple[float, str]]) -> tuple[float, str]:
    """The largest difference, NaN above all."""
    return max(differences, key=lambda d: (math.isnan(d[0]), d[0]), default=(0.0, "nothing"))


def _largest(tensor: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.linalg.vector_norm(tensor.detach(), float("inf")).item() if tensor.numel() else 0.0


def _blame(twin, twin_model, inputs, params, names, regions, tolerance, worst, where, dtype) -> str:
    """Which region alone (the others run as plain code) gives a difference: the message of the error."""
    expected = _step(twin_model, inputs, params)
    modes = {name: twin.get_submodule(name).mode for name in regions}
    culprits = []
    try:
        for name in regions:
            for other in regions:
                twin.get_submodule(other).mode = modes[other] if other == name else Mode.KEEP
            got = _step(twin, inputs, params)
            if got is None or not _worst(_differences(got, expected, names))[0] <= tolerance:
                culprits.append(name)
    finally:
        for name, mode in modes.items():
            twin.get_submodule(name).mode = mode
    named = "; ".join(f"{name} ({modes[name]}: {', '.join(regions[name])})" for name in culprits) or \
        "no single region alone (regions together)"
    return (f"invfx.optimize: the plan gives gradients that differ from plain autograd's on the example inputs "
            f"({str(dtype).replace('torch.', '')} copy): {where} off by {worst:.3g} relative (tolerance "
            f"{tolerance:g}); the difference comes from {named}. This is an invfx bug: please report it with the "
            f"model. optimize(..., modes=('keep', 'checkpoint')) avoids inverses; check_gradients=False skips this "
            "check")
