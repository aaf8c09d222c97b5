"""invfx: memory-efficient training for ordinary PyTorch models, by recomputing or inverting."""

from . import nn, runtime, utils
from .errors import BudgetError, InverseError, InvfxError, RegionError, TraceError
from .runtime import checkpoint, invertible_checkpoint

__version__ = "0.1.0"

__all__ = ["nn", "runtime", "utils", "checkpoint", "invertible_checkpoint", "InvfxError", "RegionError",
           "InverseError", "TraceError", "BudgetError"]
