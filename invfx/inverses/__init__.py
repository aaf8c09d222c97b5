"""The built-in inverse rules, each beside the forward it inverts. Importing this package registers them."""

from . import arithmetic, elementwise, linear, norm, shape

__all__ = ["arithmetic", "elementwise", "linear", "norm", "shape"]
