"""Running the model on the example inputs without leaving a trace: every pass that runs it, and optimize's own
measurements, go through :func:`example_run`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["example_run"]


@contextlib.contextmanager
def example_run(module: nn.Module, inputs: Sequence, *, requires_grad: bool = False,
                keep_grads: bool = False) -> Iterator[tuple]:
    """Yields copies of ``inputs`` to run ``module`` on (tensors cloned, detached; floating ones requiring grad
    with ``requires_grad``: a model that writes into its input in place must not change the caller's example).
    On leaving, whatever happened inside: the module's buffers (BatchNorm statistics) hold their values again,
    the CPU and CUDA random number generators their states, and with ``keep_grads`` the parameters their
    ``.grad`` (cleared meanwhile)."""
    tensors = [*module.parameters(), *module.buffers(), *(x for x in inputs if isinstance(x, torch.Tensor))]
    devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    params = list(module.parameters()) if keep_grads else []
    grads = [p.grad for p in params]
    copies = tuple(x.detach().clone().requires_grad_(requires_grad and (x.is_floating_point() or x.is_complex()))
                   if isinstance(x, torch.Tensor) else x for x in inputs)
    with torch.random.fork_rng(devices=devices):
        try:
            for p in params:
                p.grad = None
            yield copies
        finally:
            for p, grad in zip(params, grads):
                p.grad = grad
            with torch.no_grad():
                for buffer, value in buffers:
                    buffer.copy_(value)
