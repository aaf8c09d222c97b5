"""Hand-written invertible modules (the InvTorch API) and containers."""

from .container import InvertibleSequential
from .module import Module, free, mode

__all__ = ["Module", "InvertibleSequential", "free", "mode"]
