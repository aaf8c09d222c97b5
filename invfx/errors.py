"""invfx exceptions. Every error names what failed (node, module or function) and why."""

__all__ = ["InvfxError", "TraceError", "BudgetError", "InverseError", "RegionError", "PassError", "first_line"]


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name): what an invfx error quotes of another one."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


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


class PassError(InvfxError):
    """A pass of ``invfx.optimize`` found the compilation not as the pass before it promised (an invfx bug)."""
