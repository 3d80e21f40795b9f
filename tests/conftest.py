"""Shared test set-up: per-test seeding, skips for the ``cuda`` and ``triton`` markers,
and the ``test_device`` fixture.

Nothing here queries devices or imports Triton at import time: availability is checked
inside the collection hook, and only when a collected test carries the marker.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(0)
    torch.manual_seed(0)


def _cuda_missing() -> str | None:
    if torch.cuda.is_available():
        return None
    return "needs a CUDA device: torch.cuda.is_available() is False"


def _triton_missing() -> str | None:
    from alr import kernels

    ok, reason = kernels.is_available()
    return None if ok else f"needs Triton: {reason}"


# Marker -> check returning why the marked tests cannot run here (None: they can).
_REQUIREMENTS: dict[str, Callable[[], str | None]] = {
    "cuda": _cuda_missing,
    "triton": _triton_missing,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips tests marked ``cuda`` or ``triton`` where that requirement is missing."""
    reasons: dict[str, str | None] = {}
    for item in items:
        for marker, missing in _REQUIREMENTS.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in reasons:
                reasons[marker] = missing()
            if reasons[marker] is not None:
                item.add_marker(pytest.mark.skip(reason=reasons[marker]))


@pytest.fixture
def test_device() -> str:
    """The device for device-generic tests: ``$ALR_TEST_DEVICE``, "cpu" by default."""
    device = os.environ.get("ALR_TEST_DEVICE", "cpu")
    torch.device(device)  # a misspelt device fails here, with torch's message
    return device
