"""``python -m invfx demo``: train a chain of invertible couplings three ways and compare memory and time.

The same chain of hand-written additive couplings (same initial weights, same data) is trained with SGD:

* ``plain``: ordinary autograd (every block with ``checkpoint = False``);
* ``torch.utils.checkpoint``: each plain block wrapped in ``torch.utils.checkpoint.checkpoint(block, h,
  use_reentrant=False)``;
* ``invfx invertible``: the blocks' defaults (``checkpoint=True, invertible=True``) in an
  :class:`invfx.nn.InvertibleSequential`, which frees every link of the chain and rebuilds it with the inverse.

It reports the exact CPU peak memory of one training step (forward, backward, SGD update) measured after a
warm-up, so it is the step's activations and temporaries above the weights, gradients and data; the median
step time; and whether the gradients equal plain autograd's (checked on the same weights and batch).

Then the same sizes as a plainly written model (``examples.RevNetMLP``): ``invfx.optimize`` finds its
couplings; the demo prints the plan and the measured peak and step time against plain.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any, TextIO

import torch
import torch.utils.checkpoint
from tabulate import tabulate
from torch import nn

from . import nn as inn
from .memory import cpu_peak_memory

__all__ = ["AdditiveCoupling", "run_demo"]

PLAIN, TORCH_CHECKPOINT, INVERTIBLE = "plain", "torch.utils.checkpoint", "invfx invertible"
MODES = (PLAIN, TORCH_CHECKPOINT, INVERTIBLE)
RTOL, ATOL = 1e-4, 1e-5


class AdditiveCoupling(inn.Module):
    """A RevNet block on one tensor: ``y = cat(x2, x1 + F(x2))``, ``F`` a two-layer MLP.

    The halves swap, so across a chain every half is rebuilt by an inverse: ``x = cat(y2 - F(y1), y1)``.
    """

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.F = nn.Sequential(nn.Linear(width // 2, hidden), nn.ReLU(), nn.Linear(hidden, width // 2))

    def function(self, x, strict=None):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x2, x1 + self.F(x2)], dim=-1)

    def inverse(self, y, saved=()):
        y1, y2 = y.chunk(2, dim=-1)
        return torch.cat([y2 - self.F(y1), y1], dim=-1)


def _forward(chain: inn.InvertibleSequential, mode: str, x: torch.Tensor) -> torch.Tensor:
    if mode == TORCH_CHECKPOINT:
        h = x
        for block in chain:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
        return h
    return chain(x)


def _loss(chain, mode, x, target) -> torch.Tensor:
    return (_forward(chain, mode, x) - target).pow(2).mean()


def _make_models(depth: int, width: int, hidden: int, seed: int) -> dict[str, inn.InvertibleSequential]:
    torch.manual_seed(seed)
    base = inn.InvertibleSequential(*[AdditiveCoupling(width, hidden) for _ in range(depth)])
    models = {}
    for mode in MODES:
        model = copy.deepcopy(base)
        for block in model:  # the blocks' flags; the container keeps its own
            if mode in (PLAIN, TORCH_CHECKPOINT):
                block.checkpoint = False
        models[mode] = model
    return models


def _compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[bool, float]:
    same = all(torch.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in zip(got, want)) and len(got) == len(want)
    return same, max(float((a - b).abs().max()) for a, b in zip(got, want))


def run_demo(depth: int = 16, width: int = 512, batch: int = 256, steps: int = 3, *, hidden: int | None = None,
             lr: float = 1e-3, seed: int = 0, file: TextIO | None = None) -> dict[str, Any]:
    """Train the chain ``steps`` timed SGD steps in each mode and print the comparison.

    Per mode: a warm-up forward/backward at the initial weights (its gradients are compared with plain's), one
    SGD step measured with :func:`invfx.memory.cpu_peak_memory`, then ``steps`` timed SGD steps; the modes are
    interleaved step by step, in rotating order, so that they share the machine's conditions. Returns the
    numbers printed, with ``grads_match`` (bool) for the gradient check.
    """
    if width % 2:
        raise ValueError(f"width must be even (the coupling splits it in two), got {width}")
    if min(depth, width, batch, steps) < 1:
        raise ValueError("depth, width, batch and steps must be positive")
    file = sys.stdout if file is None else file
    hidden = width if hidden is None else hidden
    models = _make_models(depth, width, hidden, seed)
    optimizers = {mode: torch.optim.SGD(models[mode].parameters(), lr=lr) for mode in MODES}
    generator = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(batch, width, generator=generator), torch.randn(batch, width, generator=generator))
            for _ in range(steps + 1)]

    def train_step(mode: str, x: torch.Tensor, target: torch.Tensor) -> float:
        optimizers[mode].zero_grad(set_to_none=False)  # keep the grads allocated: the peak is the step's own
        loss = _loss(models[mode], mode, x, target)
        loss.backward()
        optimizers[mode].step()
        return loss.item()

    # 1. warm-up at the initial weights (allocates every .grad) and the gradient check against plain
    grads = {}
    for mode in MODES:
        _loss(models[mode], mode, *data[0]).backward()
        grads[mode] = [p.grad.clone() for p in models[mode].parameters()]
    checks = {mode: _compare(grads[mode], grads[PLAIN]) for mode in (TORCH_CHECKPOINT, INVERTIBLE)}

    # 2. the peak of one training step, 3. timed training steps (interleaved)
    peaks = {mode: cpu_peak_memory(lambda mode=mode: train_step(mode, *data[0]))[0] for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    losses: dict[str, float] = {}
    for index in range(steps):
        for mode in MODES[index % 3:] + MODES[:index % 3]:  # rotate, so that no mode always goes first
            start = time.perf_counter()
            losses[mode] = train_step(mode, *data[index + 1])
            times[mode].append(time.perf_counter() - start)
    step_time = {mode: statistics.median(values) for mode, values in times.items()}

    rows = [[mode, f"{peaks[mode] / 2**20:.2f}", f"{peaks[mode] / peaks[PLAIN]:.2f}x",
             f"{step_time[mode] * 1e3:.1f}", f"{step_time[mode] / step_time[PLAIN]:.2f}x", f"{losses[mode]:.6f}"]
            for mode in MODES]
    table = tabulate(rows, headers=["mode", "peak memory (MiB)", "vs plain", "step time (ms)", "vs plain",
                                    "last loss"],
                     tablefmt="github", disable_numparse=True, colalign=("left",) + ("right",) * 5)

    def ratios(mode):
        return f"{peaks[mode] / peaks[PLAIN]:.2f}x", f"{step_time[mode] / step_time[PLAIN]:.2f}x"

    grads_match = all(same for same, _ in checks.values())
    print(f"invfx demo: {depth} additive couplings (width {width}, hidden {hidden}, batch {batch}, float32), "
          f"SGD; peak of one training step above weights and grads, median of {steps} step(s), "
          f"{torch.get_num_threads()} CPU threads", file=file)
    print(file=file)
    print(table, file=file)
    print(file=file)
    for mode, (same, diff) in checks.items():
        print(f"gradients of {mode} vs plain autograd (same weights and batch, rtol {RTOL:g}, atol {ATOL:g}): "
              f"{'match' if same else 'DO NOT MATCH'} (max abs diff {diff:.2e})", file=file)
    (inv_mem, inv_time), (ckpt_mem, ckpt_time) = ratios(INVERTIBLE), ratios(TORCH_CHECKPOINT)
    print(f"invfx invertible: {inv_mem} plain's peak memory at {inv_time} its step time "
          f"(torch.utils.checkpoint: {ckpt_mem} the memory at {ckpt_time} the time).", file=file)
    optimized = _optimize_demo(depth, width, hidden, batch, seed, file)
    return dict(peak_bytes=peaks, step_seconds=step_time, last_loss=losses,
                max_grad_diff={mode: diff for mode, (_, diff) in checks.items()},
                grads_match=grads_match and optimized["grads_match"], optimize=optimized)


def _optimize_demo(depth: int, width: int, hidden: int, batch: int, seed: int, file: TextIO) -> dict[str, Any]:
    """The same sizes as a plainly written model (``examples.RevNetMLP``, no invfx in it): ``invfx.optimize``
    finds the couplings; print its plan and its measured peak and time against plain."""
    import invfx

    from .examples import RevNetMLP

    torch.manual_seed(seed)
    model = RevNetMLP(depth=depth, width=width, hidden=hidden)
    x = torch.randn(batch, width)
    optimized = invfx.optimize(model, x)
    plain_grads = _grads(model, model, x)
    difference = max(float((a - b).abs().max()) for a, b in zip(_grads(optimized, model, x), plain_grads))
    same = all(torch.allclose(a, b, rtol=RTOL, atol=ATOL)
               for a, b in zip(_grads(optimized, model, x), plain_grads))
    measured = invfx.measure(optimized, x, steps=3, baseline=model)
    print(file=file)
    print(f"invfx.optimize on a plainly written RevNet MLP (examples.RevNetMLP, {depth} blocks, same sizes):",
          file=file)
    print(optimized.plan, file=file)
    print(f"gradients vs plain autograd: {'match' if same else 'DO NOT MATCH'} (max abs diff {difference:.2e}); "
          f"measured: {measured}", file=file)
    return dict(grads_match=same, peak_ratio=measured.peak_ratio, time_ratio=measured.time_ratio)


def _grads(module: nn.Module, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    module(x).pow(2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]
