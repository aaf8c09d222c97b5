"""Fixtures every test gets (a fixed seed, the registry put back). Helpers tests import live in helpers.py."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _registry_restored():
    """Rules a test registers (or the README's example registers) do not leak into other tests."""
    from invfx import registry

    state = registry.snapshot()
    yield
    registry.restore(state)
