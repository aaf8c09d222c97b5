"""What the plan chooses for each segment."""

from __future__ import annotations

import enum

__all__ = ["Mode"]


class Mode(str, enum.Enum):
    """A segment's mode. A ``str``: ``Mode.KEEP == "keep"``, so the names users pass (``modes=("keep",
    "checkpoint")``) and the plan's rows compare and print as those words."""

    KEEP = "keep"  # plain autograd: its activations kept for backward
    CHECKPOINT = "checkpoint"  # its inputs kept, its forward recomputed in backward
    INVERTIBLE = "invertible"  # nothing kept: its inputs rebuilt from its outputs in backward
    SELECTIVE = "selective"  # its inputs and its expensive ops' outputs kept, the rest recomputed in backward

    __str__ = str.__str__
    __format__ = str.__format__
