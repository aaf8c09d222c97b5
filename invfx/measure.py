"""``invfx.measure``: the peak memory and the step time of one training step, optionally beside a baseline.

A training step is ``fn(*inputs)``, a scalar loss (``loss(output)``, or by default the sum of every floating
tensor in the output, nested tuples, lists and dicts included) and ``loss.backward()``; with ``loss=False`` it is
only ``fn(*inputs)``, for a callable that runs its own backward. The output is not held through backward (as
in ``model(x).sum().backward()``). Steps run with grad enabled and, for an ``nn.Module``, in train mode (every
submodule's ``training`` flag is restored afterwards).

Memory is taken the way the other figures of this project are: one warm-up step first, then every parameter's
``.grad`` (and that of every leaf input requiring grad) zeroed in place, allocated where it was None, so that the
measured step allocates activations and temporaries only, not gradient buffers. The peak is the largest amount
allocated above what was allocated when the step began: on CPU :func:`invfx.memory.cpu_peak_memory` (replay of
the ``torch.profiler`` allocation events of one step, exact, temporaries inside kernels included); on CUDA
``torch.cuda.max_memory_allocated`` (:func:`invfx.memory.cuda_peak_memory`). Time is the median of ``steps``
steps (CUDA: synchronized), ``.grad`` zeroed before each; with a ``baseline`` the two are timed in alternation,
order rotated every round (:func:`invfx.timing.interleaved_medians`), so drift in the machine's speed hits both.

Caveats: measuring trains without an optimizer: weights do not change, but BatchNorm running statistics are
updated by every step (warm-up and timed) and ``.grad`` is left holding the last step's gradient. Nothing is
moved between devices: ``device`` (or the first tensor input, else the first parameter, else CPU) only chooses
how the peak is measured. On CPU the profiler cannot see the free of a block allocated before it started, so
state that a module replaces at every step counts as new memory (see
:func:`invfx.memory.cpu_steady_peak_memory`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InvfxError
from .memory import cpu_peak_memory, cuda_peak_memory, mib
from .timing import interleaved_medians

__all__ = ["measure", "Measurement"]


@dataclass
class Measurement:
    """What :func:`measure` found: ``peak_bytes`` of one step above what was allocated before it,
    ``step_seconds`` (median of ``steps`` steps), the ``device`` measured on, and the ``baseline``'s own
    Measurement when one was given."""

    peak_bytes: int
    step_seconds: float
    steps: int
    device: str
    baseline: Measurement | None = None

    @property
    def peak_ratio(self) -> float | None:
        """Peak over the baseline's peak; None without a baseline, or when the baseline's peak is 0."""
        if self.baseline is None or not self.baseline.peak_bytes:
            return None
        return self.peak_bytes / self.baseline.peak_bytes

    @property
    def time_ratio(self) -> float | None:
        """Median step time over the baseline's; None without a baseline, or when the baseline's time is 0."""
        if self.baseline is None or not self.baseline.step_seconds:
            return None
        return self.step_seconds / self.baseline.step_seconds

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "step_seconds": self.step_seconds, "steps": self.steps,
                "device": self.device, "peak_ratio": self.peak_ratio, "time_ratio": self.time_ratio,
                "baseline": None if self.baseline is None else self.baseline.to_dict()}

    def __str__(self) -> str:
        text = (f"peak {mib(self.peak_bytes)} MiB, step {self.step_seconds * 1e3:.2f} ms "
                f"(median of {self.steps}, {self.device})")
        if self.baseline is not None:
            b = self.baseline
            ratios = ", ".join(f"{what} x{ratio:.3f}" for what, ratio in
                               (("peak", self.peak_ratio), ("time", self.time_ratio)) if ratio is not None)
            text += (f"; baseline peak {mib(b.peak_bytes)} MiB, step {b.step_seconds * 1e3:.2f} ms"
                     + (f": {ratios}" if ratios else ""))
        return text


def measure(module_or_callable: Callable[..., Any], *inputs: Any, steps: int = 5, baseline=None,
            loss: Callable[[Any], torch.Tensor] | None | bool = None,
            device: torch.device | str | None = None) -> Measurement:
    """Peak bytes and median time of one training step of ``module_or_callable(*inputs)`` (see the module
    docstring for what a step is and how it is measured). ``baseline``, another module or callable run on the
    same ``inputs`` with the same ``loss``, is measured the same way and timed interleaved with it; the result's
    ``baseline``, ``peak_ratio`` and ``time_ratio`` compare the two. A measured ``invfx.OptimizedModule``
    whose plan can record measurements (``plan.record_measurement``) is given the result."""
    _check_callable(module_or_callable, "module_or_callable")
    if baseline is not None:
        _check_callable(baseline, "baseline")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvfxError(f"invfx.measure: steps must be a positive integer, got {steps!r}")
    if not (loss is None or loss is False or callable(loss)):
        raise InvfxError(f"invfx.measure: loss must be a callable, None (sum the output) or False (the callable "
                         f"runs its own backward), got {type(loss).__name__}")
    where = _device(device, inputs, module_or_callable)
    if where.type == "cuda" and not torch.cuda.is_available():
        raise InvfxError(f"invfx.measure: device {where} asked for, but CUDA is not available")

    contenders = {"measured": module_or_callable}
    if baseline is not None:
        contenders["baseline"] = baseline
    modes = {id(m): m.training for fn in contenders.values() if isinstance(fn, nn.Module) for m in fn.modules()}
    leaves = [t for t in _tensors(inputs) if t.is_leaf and t.requires_grad]
    try:
        steps_of = {name: _training_step(fn, inputs, loss) for name, fn in contenders.items()}

        def prepare(name: str) -> None:
            _zero_grads(contenders[name], leaves)
            if where.type == "cuda":
                torch.cuda.synchronize(where)

        peaks = {}
        for name, fn in contenders.items():
            if isinstance(fn, nn.Module):
                fn.train()
            steps_of[name]()  # warm-up: allocates .grad, initializes lazy state, fills caches
            prepare(name)
            peaks[name] = (cuda_peak_memory(steps_of[name], where) if where.type == "cuda"
                           else cpu_peak_memory(steps_of[name]))[0]
        if where.type == "cuda":
            timed = {name: lambda step=step: (step(), torch.cuda.synchronize(where)) for name, step in steps_of.items()}
        else:
            timed = steps_of
        times = interleaved_medians(timed, steps, prepare=prepare)
    finally:
        for fn in contenders.values():
            if isinstance(fn, nn.Module):
                for m in fn.modules():
                    m.training = modes.get(id(m), m.training)

    measured = Measurement(peaks["measured"], times["measured"], steps, str(where))
    if baseline is not None:
        measured.baseline = Measurement(peaks["baseline"], times["baseline"], steps, str(where))
    # invfx.OptimizedModule's plan shows measured figures beside its estimates where it knows how to record
    # them; duck-typed, so neither a plan without the method nor an unrelated ``.plan`` attribute breaks this.
    plan = getattr(module_or_callable, "plan", None)
    if hasattr(plan, "record_measurement"):
        plan.record_measurement(measured)
    return measured


def _check_callable(fn: Any, what: str) -> None:
    if not callable(fn):
        raise InvfxError(f"invfx.measure: {what} must be an nn.Module or a callable, got {type(fn).__name__}")


def _tensors(value: Any):
    """Every tensor in ``value``, through nested tuples, lists and dict values, in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _device(device, inputs: tuple, fn: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in _tensors(inputs):
        return tensor.device
    if isinstance(fn, nn.Module):
        for p in fn.parameters():
            return p.device
    return torch.device("cpu")


def _training_step(fn: Callable, inputs: tuple, loss) -> Callable[[], None]:
    def step() -> None:
        with torch.enable_grad():
            output = fn(*inputs)
            if loss is False:
                return
            value = loss(output) if loss is not None else _summed(output)
            del output  # not held through backward, as in ``model(x).sum().backward()``
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise InvfxError("invfx.measure: loss(output) must return a scalar tensor, got "
                                 + (f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                                    else type(value).__name__))
            if not value.requires_grad:
                raise InvfxError("invfx.measure: the loss does not require grad (no parameter or input that "
                                 "requires grad reaches it), so there is no backward to measure")
            value.backward()
    return step


def _summed(output: Any) -> torch.Tensor:
    floating = [t for t in _tensors(output) if t.is_floating_point()]
    if not floating:
        raise InvfxError(f"invfx.measure: the output ({type(output).__name__}) holds no floating-point tensor to "
                         "sum into a loss; pass loss=callable(output) -> scalar tensor, or loss=False if the "
                         "callable runs its own backward")
    total = floating[0].sum()
    for t in floating[1:]:
        total = total + t.sum()
    return total


def _zero_grads(fn: Any, leaves: list[torch.Tensor]) -> None:
    """Zero ``.grad`` in place (allocating it where None), so a step allocates no gradient buffers."""
    params = list(fn.parameters()) if isinstance(fn, nn.Module) else []
    with torch.no_grad():
        for t in params + leaves:
            if not t.requires_grad:
                continue
            if t.grad is None:
                t.grad = torch.zeros_like(t)
            else:
                t.grad.zero_()
