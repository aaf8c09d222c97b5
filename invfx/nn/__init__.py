"""Hand-written invertible modules (the InvTorch API), containers and the invertible layer catalogue."""

from .container import InvertibleSequential
from .flows import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    CheckerboardCoupling,
    HaarDownsampling,
    InvertibleConv1x1,
    InvertibleLinear,
    Permutation,
    Reverse,
    Squeeze,
)
from .module import Module, free, mode

__all__ = ["Module", "InvertibleSequential", "free", "mode",
           "AdditiveCoupling", "AffineCoupling", "CheckerboardCoupling", "ActNorm", "InvertibleLinear",
           "InvertibleConv1x1", "Permutation", "Reverse", "Squeeze", "HaarDownsampling"]
