"""Pass 5: measure each region's reconstruction on the example inputs; keep the regions that do not rebuild.

The optimized module runs once on the example inputs (regions as plain code; the model's buffers and the RNG
are left as they were). Each invertible region then runs its forward and its rebuild on the inputs it saw,
with the same dropout masks, and the rebuilt inputs are compared with the real ones. A region whose error
exceeds the runtime's tolerance for the dtype (``invfx.runtime.region.reconstruction_tolerance``), or is not
finite (tanh saturated to 1, exp overflowed), runs as plain code instead: its plan row says so and why. This
is where exploding activations fall back, before any input is freed on their account.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..runtime import rng_marks
from ..runtime.region import relative_error, tolerance_for
from ..runtime.state import RngState
from .rewrite import InvertibleRegion

__all__ = ["check_reconstruction"]


def check_reconstruction(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, str]:
    """Switch the regions of ``module`` that do not rebuild their example inputs to plain code; returns the
    reason for each region switched, by region name."""
    regions = {m.region_name: m for m in module.modules() if isinstance(m, InvertibleRegion)}
    if not regions:
        return {}
    seen: dict[str, tuple] = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, args)  # (a hook returning a value would replace the output)
        return hook

    handles = [region.register_forward_hook(record(name)) for name, region in regions.items()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    rng = torch.get_rng_state()
    refused: dict[str, str] = {}
    try:
        with torch.no_grad():
            module(*example_inputs)
            for name, args in seen.items():
                reason = _reconstruction_error(regions[name], args)
                if reason is not None:
                    regions[name].invertible = False
                    refused[name] = reason
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        torch.set_rng_state(rng)
    return refused


def _reconstruction_error(region: InvertibleRegion, args: tuple) -> str | None:
    state = RngState(args)
    with rng_marks("record", state):
        outputs = region.forward_body(*args)
    state.set()
    with rng_marks("replay", state):
        try:
            rebuilt = region.rebuild_body(*outputs, *[args[i] for i in region.kept])
        except Exception as error:  # noqa: BLE001 - an inverse that fails here would fail in backward
            return f"its rebuild fails on the example input ({type(error).__name__}: {error})"
    for position, value in zip(region.rebuilt, rebuilt):
        real = args[position]
        if not (isinstance(real, torch.Tensor) and real.is_floating_point()):
            continue
        tolerance = tolerance_for(real.dtype)
        if tolerance is None or real.numel() == 0:
            continue
        error = relative_error(value, real)
        if not error <= tolerance:  # NaN too
            return (f"rebuilding its input {position} from its outputs on the example input is off by {error:.2g} "
                    f"(tolerance {tolerance:g} for {real.dtype})")
    return None
