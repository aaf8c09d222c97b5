"""What tests share: comparisons of tensors and gradients. (Fixtures are in conftest.py; the multi-process
watchdog is ranks.py.)"""

import io
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CountOps", "assert_close", "grads_of", "model_library", "saved_and_loaded", "zero"]


class CountOps(TorchDispatchMode):
    """How many times each op packet runs (``counts[torch.ops.aten.convolution]``)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket] = self.counts.get(func.overloadpacket, 0) + 1
        return func(*args, **(kwargs or {}))


def model_library(name):
    """The optional model library ``name`` (e.g. "timm", "FrEIA.framework"), imported the way benchmarks/zoo.py
    imports it (torchvision made importable on CPU torch: benchmarks/model_libraries.py); the test is skipped
    where it is not installed (`make test` installs them: the models extra)."""
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:  # (as benchmarks/zoo.py imports it: one module, whoever imports it first)
        sys.path.insert(0, benchmarks)
    import model_libraries

    module = model_libraries.import_library(name)
    if module is None:
        pytest.skip(f"{name} is not installed (pip install -c constraints.txt -e '.[models]')")
    return module


def grads_of(tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors]


def zero(tensors):
    for t in tensors:
        t.grad = None


def assert_close(actual, expected, rtol=1e-10, atol=1e-12, what=""):
    """Tensors, or (possibly nested) tuples/lists of tensors and None, are equal within tolerance."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, rtol, atol, f"{what}[{i}]")
        return
    if expected is None:
        assert actual is None, f"{what}: expected None, got a tensor"
        return
    if not isinstance(expected, torch.Tensor):
        assert actual == expected, what
        return
    assert actual is not None, f"{what}: expected a tensor, got None"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def saved_and_loaded(module):
    """``module`` through ``torch.save`` and ``torch.load`` (in memory)."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)
