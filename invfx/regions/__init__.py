"""What an optimized model trains with: its regions (checkpointed or invertible segments run through the
runtime) and their fused backward. ``invfx.passes`` makes them; nothing here analyses or rewrites a graph."""

from .body import Inverse, RngMark, ShapeMeta, is_rng_mark
from .fused import FusedReplay
from .modules import BodyRegion, CheckpointRegion, InvertibleRegion, regions_run_plain, watch_registrations

__all__ = ["BodyRegion", "CheckpointRegion", "InvertibleRegion", "FusedReplay", "Inverse", "RngMark", "ShapeMeta",
           "is_rng_mark", "regions_run_plain", "watch_registrations"]
