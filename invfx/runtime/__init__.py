"""The invfx runtime: checkpointed and invertible regions as autograd functions. Knows nothing about fx."""

from .graft import graft, stand_in
from .region import (
    CHECKPOINT,
    INVERTIBLE,
    Region,
    RegionFunction,
    ReplayContext,
    checkpoint,
    invertible_checkpoint,
    rng_mark,
    rng_marks,
    run_region,
)

__all__ = ["CHECKPOINT", "INVERTIBLE", "Region", "RegionFunction", "ReplayContext", "checkpoint",
           "invertible_checkpoint", "rng_mark", "rng_marks", "run_region", "graft", "stand_in"]
