"""The fx passes of invfx.optimize. Each pass is a small class over one :class:`~invfx.passes.infra.Compilation`
(``pipeline.py``: what it requires, what it does, what it ensures), calling functions over the traced graph and
its segments:

trace -> annotate -> split_through_cat -> find_segments (solve) -> build_invertible_region -> check_reconstruction
-> measure_costs -> the planner (``invfx.planner``) -> region_units (chains) -> write_graph.

What the rewritten model trains with (the region modules and their fused backward) lives in ``invfx.regions``;
nothing here runs in a training step."""

from .annotate import annotate
from .chain import RegionUnit, region_units
from .cost import measure_costs
from .infra import Compilation, CompilationPass, run_passes
from .pipeline import PIPELINE
from .rewrite import (
                      BodyRegion,
                      CheckpointRegion,
                      InvertibleRegion,
                      build_checkpoint_region,
                      build_invertible_region,
                      write_graph,
)
from .segments import Segment, find_segments
from .solve import Rebuild, Step, solve
from .trace import trace
from .validate import check_reconstruction

__all__ = ["trace", "annotate", "find_segments", "Segment", "solve", "Rebuild", "Step", "build_invertible_region",
           "build_checkpoint_region", "write_graph", "region_units", "RegionUnit", "BodyRegion", "CheckpointRegion",
           "InvertibleRegion", "check_reconstruction", "measure_costs", "Compilation", "CompilationPass",
           "run_passes", "PIPELINE"]
