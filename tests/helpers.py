"""What tests share: comparisons of tensors and gradients. (Fixtures are in conftest.py; the multi-process
watchdog is ranks.py.)"""

import torch

__all__ = ["assert_close", "grads_of", "zero"]


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
