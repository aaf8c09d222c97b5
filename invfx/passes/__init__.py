"""The fx passes of invfx.optimize, each a function over a GraphModule talking through ``node.meta``:
trace -> annotate -> find_segments (solve) -> rewrite_segment / rewrite_checkpoint -> check_reconstruction ->
measure_costs, then the planner (``invfx.planner``) picks each region's mode, and merge_chains (``chain``) makes
each run of consecutive invertible regions one region. What the rewritten model trains with (the region modules
and their fused backward) lives in ``invfx.regions``; nothing here runs in a training step."""

from .annotate import annotate
from .chain import merge_chains
from .cost import measure_costs
from .rewrite import BodyRegion, CheckpointRegion, InvertibleRegion, rewrite_checkpoint, rewrite_segment
from .segments import Segment, find_segments
from .solve import Rebuild, Step, solve
from .trace import trace
from .validate import check_reconstruction

__all__ = ["trace", "annotate", "find_segments", "Segment", "solve", "Rebuild", "Step", "rewrite_segment",
           "rewrite_checkpoint", "BodyRegion", "CheckpointRegion", "InvertibleRegion", "check_reconstruction",
           "measure_costs", "merge_chains"]
