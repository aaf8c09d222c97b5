"""Import the optional model libraries (FrEIA, timm, torchvision, transformers) the zoo tests and benchmark use.

torchvision's wheels on the package index are CUDA builds. With the CPU build of torch that ``make`` installs
(constraints.txt), torchvision's compiled ops (``torchvision/_C.so``) cannot load: they link ``libtorch_cuda``.
torchvision then still imports everything written in Python (its models among them) except that two of its fake-
tensor registrations, for ``torchvision::nms`` and ``torchvision::qnms``, are not guarded and raise
``RuntimeError: operator torchvision::nms does not exist``. timm and transformers import torchvision when it is
installed, so they fail the same way. :func:`make_torchvision_importable` declares those two operators' schemas
(without kernels: nms then raises if called, which no model here does) so that the import goes through. Where
torchvision's ops load (a matching CPU or CUDA build), it does nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

_declared: list[torch.library.Library] = []  # kept alive: a Library's definitions go with it


def make_torchvision_importable() -> None:
    """Declare ``torchvision::nms`` / ``qnms`` where torchvision is installed and its compiled ops cannot load."""
    if _declared:
        return
    try:  # declared already (by torchvision's compiled ops, or by another copy of this module)
        torch._C._dispatch_has_kernel_for_dispatch_key("torchvision::nms", "CPU")
        return
    except RuntimeError:
        pass
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return
    compiled = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    if compiled is not None:
        try:
            torch.ops.load_library(str(compiled))  # (what torchvision's import does first; loaded once)
            return
        except OSError:  # a CUDA build on a CPU torch: libtorch_cuda.so missing
            pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declared.append(library)


def import_library(name: str):
    """``importlib.import_module(name)`` after :func:`make_torchvision_importable`; None where not installed."""
    make_torchvision_importable()
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
