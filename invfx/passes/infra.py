"""The shape of ``invfx.optimize``'s pipeline: one :class:`Compilation` that passes fill in, in order.

Shaped as torch.fx's ``PassBase`` (``requires`` / ``call`` / ``ensures``), over the compilation rather than a
GraphModule alone: a pass states what it needs before it runs (:meth:`CompilationPass.requires`) and what it
has made true after (:meth:`CompilationPass.ensures`), and a broken contract is a :class:`~invfx.errors.PassError`
naming the pass. Facts go from pass to pass through the compilation's fields, never through attributes of
modules; a field a pass fills is None (or empty) until it has run.

The traced graph changes only before segments are found (tracing, the ``cat``/``split`` simplification). From
then on every measurement runs on that graph segment by segment (``segment_run``), regions are built beside it,
and the module that trains is written from it once, at the end (``WriteModule``; a budget's calibration writes
it again from the same graph when it replans).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from ..errors import InvfxError, PassError
from ..modes import Mode
from ..options import OptimizeOptions
from ..planner import ChainPlan
from ..regions.modules import BodyRegion, InvertibleRegion, OptimizedModule
from .chain import RegionUnit
from .cost import RegionCosts
from .segments import Segment

__all__ = ["Compilation", "CompilationPass", "run_passes", "graph_signature"]


@dataclass
class Compilation:
    """Everything ``invfx.optimize`` knows about one model, filled in pass by pass."""

    # what the caller asked for (checked by optimize)
    model: nn.Module
    inputs: tuple[object, ...]
    modes: frozenset[Mode]
    budget: int | float | None
    options: OptimizeOptions
    leaf_modules: tuple[type[nn.Module] | nn.Module, ...] = ()
    # Trace
    traced: fx.GraphModule | None = None
    opaque: dict[str, str] = field(default_factory=dict)  # submodules traced as leaves: why
    constants: dict[str, object] = field(default_factory=dict)  # forward parameters traced as their defaults
    # LeanDropouts: the LeanDropout children made, by name, and what their calls save at the example's size
    lean_dropouts: dict[str, int] = field(default_factory=dict)
    # RecomputeSavedInputs: the RecomputedInput children made, by name, and the bytes each no longer keeps
    recomputed_saved: dict[str, int] = field(default_factory=dict)
    # FindSegments: the graph cut into a chain of segments, each with a name (``inv_blocks_3``, ``seg_head``)
    segments: list[Segment] | None = None
    names: list[str] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)  # segments that run as plain code, never a region: why
    signature: tuple[int, ...] = ()  # the traced graph the segments were found in (see graph_signature)
    # BuildRegions: each invertible segment's region, built beside the graph
    regions: dict[str, InvertibleRegion] | None = None
    # CheckReconstruction
    refused: dict[str, str] | None = None  # invertible segments that do not rebuild their example: why
    reconstruction_errors: dict[str, float] = field(default_factory=dict)
    # MeasureCosts
    costs: RegionCosts | None = None
    # PlanModes (and Calibrate, which plans again)
    chain: ChainPlan | None = None
    chosen: dict[str, Mode] | None = None  # mode of each segment that may run as a region
    kept_calls: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a selective segment's kept calls
    groups: list[tuple[str, ...]] = field(default_factory=list)  # the planned chain: segments run as one, in order
    merged: dict[tuple[str, ...], Segment | None] = field(default_factory=dict)  # groups as one segment (None: not)
    calibration: dict[str, int] | None = None  # the example step measured when planning under a budget
    # segments whose Linear calls keep their LayerNorm / GELU inputs as they are: the budget has room for them
    rebuilds_dropped: frozenset[str] = frozenset()
    # GroupRegions: the regions the module runs, a chain per run of invertible segments
    units: list[RegionUnit] | None = None
    solved_runs: dict[tuple[str, ...], Segment | str] = field(default_factory=dict)
    # WriteModule
    optimized: OptimizedModule | None = None
    # regions made (BuildRegions, then WriteModule), by the segments each runs: reused when calibration rewrites
    built: dict[tuple[str, ...], BodyRegion] = field(default_factory=dict)

    @property
    def plan(self) -> object | None:
        """The report (:class:`invfx.Plan`), once the ``report`` pass has run."""
        return getattr(self.optimized, "plan", None)

    def segment(self, name: str) -> Segment:
        assert self.segments is not None
        return self.segments[self.names.index(name)]

    def candidates(self) -> dict[str, Segment]:
        """The segments that may run as regions (not blocked), by name, in graph order."""
        assert self.segments is not None
        return {name: s for name, s in zip(self.names, self.segments) if name not in self.blocked}


def graph_signature(graph: fx.Graph) -> tuple[int, ...]:
    """The identity of a graph's nodes in order: equal as long as no node was added, removed or moved."""
    return tuple(id(node) for node in graph.nodes)


class CompilationPass:
    """One step of the pipeline. ``requires`` checks that the fields it reads were filled, ``call`` does the
    work, ``ensures`` checks what it promises; :meth:`need` raises the :class:`PassError` naming the pass."""

    name = "pass"

    def requires(self, state: Compilation) -> None:
        """Raise :class:`PassError` if ``state`` lacks what :meth:`call` reads."""

    def call(self, state: Compilation) -> None:
        raise NotImplementedError

    def ensures(self, state: Compilation) -> None:
        """Raise :class:`PassError` if :meth:`call` did not leave ``state`` as promised."""

    def need(self, condition: bool, what: str) -> None:
        if not condition:
            raise PassError(f"invfx.optimize: pass {self.name!r}: {what}. This is an invfx bug: please report it "
                            "with the model")

    def __call__(self, state: Compilation) -> Compilation:
        self.requires(state)
        try:
            self.call(state)
        except PassError:
            raise
        except Exception as error:
            add_note = getattr(error, "add_note", None)  # (Python 3.11 and later)
            if add_note is not None and not isinstance(error, InvfxError):  # (invfx's errors name what failed)
                add_note(f"(raised in invfx.optimize's pass {self.name!r})")
            raise
        self.ensures(state)
        return state

    def __repr__(self) -> str:
        return f"<invfx pass {self.name}>"


def run_passes(state: Compilation, passes: Iterable[CompilationPass]) -> Compilation:
    """Run ``passes`` over ``state`` in order; returns it."""
    for compilation_pass in passes:
        compilation_pass(state)
    return state
