"""Grad-mode switches as calls a traced graph can hold.

torch.fx runs a model's ``with torch.no_grad():`` while tracing and records nothing of it: the traced graph
computed with grad where the model did not (its parameters got gradients they never had). The tracer records
each switch as a pair of calls instead: ``enter_grad_mode(False)`` returns the mode it replaced, and
``exit_grad_mode(previous)`` puts that back, so the graph switches exactly as the model did, whatever mode the
caller runs it in.
"""

from __future__ import annotations

import torch

__all__ = ["enter_grad_mode", "exit_grad_mode"]


def enter_grad_mode(enabled: bool) -> bool:
    """Set grad mode to ``enabled``; returns the mode before (``torch.no_grad().__enter__`` as a function)."""
    previous = torch.is_grad_enabled()
    torch._C._set_grad_enabled(enabled)
    return previous


def exit_grad_mode(previous: bool) -> None:
    """Put back the grad mode :func:`enter_grad_mode` replaced."""
    torch._C._set_grad_enabled(previous)
