"""Measure each invertible segment's reconstruction on the example inputs; refuse those that do not rebuild.

The traced model runs once on the example inputs (:class:`SegmentRun`; the model's buffers and the RNG are
left as they were). Each invertible segment's region (built beside the graph) then runs its forward and its
rebuild on the inputs the segment saw, with the same dropout masks, and the rebuilt inputs are compared with the
real ones. A region whose error exceeds the runtime's tolerance for the dtype (``invfx.tolerances``), or is not
finite (tanh saturated to 1, exp overflowed), may not run invertible: its plan row says so and why. This is
where exploding activations fall back, before any input is freed on their account.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx

from ..runtime import rng_marks
from ..runtime.branches import BranchRecord, recording, replaying
from ..runtime.region import relative_error
from ..runtime.state import RngState
from ..tolerances import TOLERANCES, tolerance_for
from .example import example_run
from .rewrite import InvertibleRegion, regions_run_plain
from .segment_run import SegmentRun
from .segments import Segment

__all__ = ["check_reconstruction"]


def check_reconstruction(module: fx.GraphModule, example_inputs: Sequence, segments: Mapping[str, Segment],
                         regions: Mapping[str, InvertibleRegion]) -> tuple[dict[str, str], dict[str, float]]:
    """Run ``module`` (the traced model) on the example inputs and each segment's region (``regions``, by
    segment name) on what its segment read there. Returns the reason each refused region does not rebuild, and
    the largest relative error of each region that does."""
    if not regions:
        return {}, {}
    seen: dict[str, tuple] = {}
    outputs_of: dict[str, tuple] = {}
    rng_before: dict[str, RngState] = {}

    def enter(name: str, args: tuple) -> None:
        # the RNG as the segment found it: rerun from it, the region draws the model run's dropout masks
        rng_before[name] = RngState([a for a in args if isinstance(a, torch.Tensor)])
        seen[name] = args

    def leave(name: str, outputs: tuple) -> None:
        outputs_of[name] = outputs

    refused: dict[str, str] = {}
    errors: dict[str, float] = {}
    # (regions_run_plain: a region of an optimized module the model holds runs as plain code)
    with example_run(module, example_inputs) as inputs, torch.no_grad(), regions_run_plain():
        SegmentRun(module, {name: segments[name] for name in regions}, enter, leave).run(*inputs)
        for name, args in seen.items():
            reason, error = _reconstruction_error(regions[name], args, rng=rng_before[name])
            if error is not None:
                errors[name] = error  # (the plan reports it as the numerical risk)
            if reason is not None:
                refused[name] = reason
        refused.update(_compounded(regions, seen, outputs_of, refused, errors, rng_before))
    return refused, errors


def _compounded(regions: Mapping[str, InvertibleRegion], seen: dict[str, tuple], outputs_of: dict[str, tuple],
                refused: dict[str, str], errors: dict[str, float], rng_before: dict[str, RngState]) -> dict[str, str]:
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
            refusals[name] = f"{reason}, rebuilt through the invertible regions after it"
            continue
        errors[name] = max(error or 0.0, errors.get(name, 0.0))
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
    branches = BranchRecord(region.region_name)  # (as the runtime: the rebuild takes the forward's branches)
    with rng_marks("record", state), recording(branches):
        outputs = region.forward_body(*args)
    if start is not None:
        outputs = start
    state.set()
    with rng_marks("replay", state), replaying(branches):
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

