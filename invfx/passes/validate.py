"""Pass 5: measure each region's reconstruction on the example inputs; keep the regions that do not rebuild.

The optimized module runs once on the example inputs (regions as plain code; the model's buffers and the RNG
are left as they were). Each invertible region then runs its forward and its rebuild on the inputs it saw,
with the same dropout masks, and the rebuilt inputs are compared with the real ones. A region whose error
exceeds the runtime's tolerance for the dtype (``invfx.tolerances``), or is not
finite (tanh saturated to 1, exp overflowed), runs as plain code instead: its plan row says so and why. This
is where exploding activations fall back, before any input is freed on their account.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..runtime import rng_marks
from ..runtime.region import relative_error
from ..runtime.state import RngState
from ..tolerances import TOLERANCES, tolerance_for
from .example import example_run
from .rewrite import InvertibleRegion, regions_run_plain

__all__ = ["check_reconstruction"]


def check_reconstruction(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, str]:
    """Switch the regions of ``module`` that do not rebuild their example inputs to plain code; returns the
    reason for each region switched, by region name."""
    regions = {m.region_name: m for m in module.modules() if isinstance(m, InvertibleRegion)}
    if not regions:
        return {}
    seen: dict[str, tuple] = {}
    outputs_of: dict[str, tuple] = {}

    def record(name):
        def hook(module, args, output):
            if name not in seen:  # (a hook returning a value would replace the output)
                seen[name] = args
                outputs_of[name] = output if isinstance(output, tuple) else (output,)
        return hook

    rng_before: dict[str, RngState] = {}

    def capture(name):
        def hook(module, args):
            # the RNG as the region found it: rerun from it, the region draws the module run's dropout masks
            rng_before.setdefault(name, RngState([a for a in args if isinstance(a, torch.Tensor)]))
        return hook

    handles = [region.register_forward_hook(record(name)) for name, region in regions.items()]
    handles += [region.register_forward_pre_hook(capture(name)) for name, region in regions.items()]
    refused: dict[str, str] = {}
    try:
        with example_run(module, example_inputs) as inputs, torch.no_grad(), regions_run_plain():
            module(*inputs)
            for name, args in seen.items():
                reason, error = _reconstruction_error(regions[name], args, rng=rng_before[name])
                regions[name].reconstruction_error = error  # (the plan reports it as the numerical risk)
                if reason is not None:
                    regions[name].invertible = False
                    refused[name] = reason
            refused.update(_compounded(regions, seen, outputs_of, refused, rng_before))
    finally:
        for handle in handles:
            handle.remove()
    return refused


def _compounded(regions: dict[str, InvertibleRegion], seen: dict[str, tuple], outputs_of: dict[str, tuple],
                refused: dict[str, str], rng_before: dict[str, RngState]) -> dict[str, str]:
    """In backward a region rebuilds its inputs from outputs that the next region rebuilt, not from the real
    ones: errors compound along a chain (a leaky ReLU's inverse multiplies them by 1/slope at each layer). Replay
    the chain from its end on the example, each region starting from what the next one rebuilt; a region whose
    rebuilt input is then off by more than the tolerance is refused, which keeps its input and restarts the
    chain from real values there."""
    rebuilt_of: dict[int, torch.Tensor] = {}  # id of a real value -> its value as rebuilt by later regions
    refusals = {}
    for name in reversed(list(seen)):
        if name in refused:
            continue
        region, args = regions[name], seen[name]
        start = tuple(rebuilt_of.get(id(o), o) if isinstance(o, torch.Tensor) else o for o in outputs_of[name])
        reason, error = _reconstruction_error(region, args, start, rebuilt_of, rng_before[name])
        if reason is not None:
            region.invertible = False
            refusals[name] = f"{reason}, rebuilt through the invertible regions after it"
            continue
        region.reconstruction_error = max(error, getattr(region, "reconstruction_error", 0.0) or 0.0)
    return refusals


def _reconstruction_error(region: InvertibleRegion, args: tuple, start: tuple | None = None,
                          rebuilt_of: dict | None = None, rng: RngState | None = None
                          ) -> tuple[str | None, float | None]:
    """Why the region does not rebuild its example inputs (None if it does), and the largest relative error.
    ``start``: the outputs to rebuild from (as later regions rebuilt them) instead of its own; ``rebuilt_of``
    receives what it rebuilds, by the id of the real input."""
    if rng is not None:
        rng.set()
    state = RngState(args)
    with rng_marks("record", state):
        outputs = region.forward_body(*args)
    if start is not None:
        outputs = start
    state.set()
    with rng_marks("replay", state):
        try:
            rebuilt = region.rebuild_body(*outputs, *[args[i] for i in region.kept])
        except Exception as error:  # noqa: BLE001 - an inverse that fails here would fail in backward
            return f"its rebuild fails on the example input ({type(error).__name__}: {error})", None
    # What an inverse computed from the outputs can get right: a few ulps of their magnitude. A rebuilt input far
    # smaller than the outputs (a running log-det that starts at zeros) differs from the real one by that much
    # even when exact, which relative to itself was "off by 3e+20" and refused the region.
    magnitude = max((float(torch.linalg.vector_norm(o.detach(), float("inf"))) for o in outputs
                     if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel()), default=0.0)
    worst = 0.0
    for position, value in zip(region.rebuilt, rebuilt):
        real = args[position]
        if not (isinstance(real, torch.Tensor) and real.is_floating_point()):
            continue
        tolerance = tolerance_for(real.dtype)
        if tolerance is not None and rebuilt_of is not None:
            tolerance = min(tolerance, TOLERANCES[real.dtype].chain if real.dtype in TOLERANCES else tolerance)
        if tolerance is None or real.numel() == 0:
            continue
        error = relative_error(value, real, ROUNDING_ULPS * torch.finfo(real.dtype).eps * magnitude / tolerance)
        if rebuilt_of is not None:
            rebuilt_of[id(real)] = value
        if not error <= tolerance:  # NaN too
            return (f"rebuilding its input {position} from its outputs on the example input is off by {error:.2g} "
                    f"(tolerance {tolerance:g} for {real.dtype})"), error
        worst = max(worst, error)
    return None, worst


#: the ulps of the outputs' magnitude a rebuilt input may differ by, however small the input itself
ROUNDING_ULPS = 64

