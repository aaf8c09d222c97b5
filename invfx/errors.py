"""invfx exceptions. Every error names what failed (node, module or function) and why."""

__all__ = ["InvfxError", "TraceError", "BudgetError", "InverseError", "RegionError"]


class InvfxError(RuntimeError):
    """Base class of every error invfx raises on purpose."""


class RegionError(InvfxError):
    """A region (checkpointed or invertible function) was used against its contract."""


class InverseError(InvfxError):
    """An inverse is missing, refused by its conditions, or failed to rebuild its inputs."""


class TraceError(InvfxError):
    """Nothing of the model could be traced."""


class BudgetError(InvfxError):
    """The requested memory budget cannot be met."""
