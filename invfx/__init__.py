"""invfx: memory-efficient training for ordinary PyTorch models, by recomputing or inverting."""

from . import inverses, nn, regions, registry, runtime, utils
from .check import GradientCheckError
from .errors import BudgetError, InverseError, InvfxError, RegionError, TraceError
from .measure import Measurement, measure
from .optimize import OptimizedModule, Plan, optimize
from .options import OptimizeOptions
from .registry import register_inverse
from .runtime import checkpoint, invertible_checkpoint

__version__ = "0.1.0"

__all__ = ["optimize", "OptimizeOptions", "OptimizedModule", "Plan", "nn", "regions", "runtime", "utils", "registry",
           "inverses", "checkpoint", "invertible_checkpoint", "register_inverse", "measure", "Measurement",
           "InvfxError", "RegionError", "InverseError", "TraceError", "BudgetError", "GradientCheckError"]
