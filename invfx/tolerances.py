"""Every tolerance invfx compares values with, in one table: per dtype, how far a value may be from the one it
stands for, by what compares them. Set a dtype's ``reconstruction`` to None to skip the backward's check for it.

* ``reconstruction``: the backward's check of a rebuilt input (max |f(rebuilt) - kept output| / max |kept
  output|, ``invfx.runtime``). Round trips of well-conditioned inverses stay orders of magnitude below it; a wrong
  inverse gives errors of order one.
* ``chain``: the plan's check of a rebuilt input along a chain of regions on the example inputs
  (``invfx.passes.validate``): stricter, since an error in a rebuilt input goes on into the gradients.
* ``gradients``: optimize's gradient check (``invfx.check``), per tensor against the largest of its kind: float64
  leaves only rounding through inverses; in a model's own low precision a rebuilt input may flip a ReLU mask, so
  there only a gross difference (a lost or doubled gradient) is caught.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["Tolerance", "TOLERANCES", "reconstruction_tolerance", "tolerance_for"]


@dataclass
class Tolerance:
    reconstruction: float | None
    chain: float
    gradients: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(reconstruction=1e-7, chain=1e-7, gradients=1e-6),
    torch.float32: Tolerance(reconstruction=1e-3, chain=1e-5, gradients=5e-2),
    torch.bfloat16: Tolerance(reconstruction=1e-1, chain=2e-2, gradients=0.25),
    torch.float16: Tolerance(reconstruction=5e-2, chain=2e-3, gradients=0.25),
}


def reconstruction_tolerance(dtype: torch.dtype) -> float | None:
    found = TOLERANCES.get(dtype)
    return found.reconstruction if found is not None else None


def tolerance_for(dtype: torch.dtype, computed_in: Iterable[torch.dtype] = ()) -> float | None:
    """The reconstruction tolerance for values stored in ``dtype`` and computed in ``computed_in`` (autocast's
    lower precisions); None: not checked."""
    tolerance = reconstruction_tolerance(dtype)
    if tolerance is None:
        return None
    return max([tolerance] + [reconstruction_tolerance(d) or 0.0 for d in computed_in])
