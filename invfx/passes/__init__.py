"""The fx passes of invfx.optimize, each a function over a GraphModule talking through ``node.meta``:
trace -> annotate -> find_segments (solve) -> rewrite_segment -> check_reconstruction. The fused replay
(``fuse.FusedReplay``) is what a rewritten region runs in backward."""

from .annotate import annotate
from .rewrite import InvertibleRegion, rewrite_segment
from .segments import Segment, find_segments
from .solve import Rebuild, Step, solve
from .trace import trace
from .validate import check_reconstruction

__all__ = ["trace", "annotate", "find_segments", "Segment", "solve", "Rebuild", "Step", "rewrite_segment",
           "InvertibleRegion", "check_reconstruction"]
