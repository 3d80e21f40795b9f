"""Shared test set-up: per-test seeding, skips for the ``cuda`` and ``triton`` markers,
the ``backend``/``device`` fixtures of the native-backend tests, and ``test_device``.

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
def one_thread():
    """One intra-op thread for the test. The reference backend runs hundreds of tiny torch
    ops per step, whose parallel regions crawl when other jobs hold the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def test_device() -> str:
    """The device for device-generic tests: ``$ALR_TEST_DEVICE``, "cpu" by default."""
    device = os.environ.get("ALR_TEST_DEVICE", "cpu")
    torch.device(device)  # a misspelt device fails here, with torch's message
    return device


NATIVE_BACKENDS = ("cpu", "cuda", "triton")


@pytest.fixture(params=NATIVE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each native backend in turn; skipped where it cannot run."""
    from alr import backends

    reason = backends.backend_unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    return request.param


@pytest.fixture
def device(backend: str) -> torch.device:
    """Where ``backend`` runs here (see ``_device_of``)."""
    return _device_of(backend)


@pytest.fixture(params=("reference", *NATIVE_BACKENDS))
def any_backend(request: pytest.FixtureRequest) -> tuple[str, torch.device]:
    """Each backend, the reference included, with where it runs here; skipped where it
    cannot run."""
    from alr import backends

    reason = backends.backend_unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    return request.param, _device_of(request.param)


def _device_of(backend: str) -> torch.device:
    """Where ``backend`` runs here: ``triton`` runs on CUDA when a GPU is present, else on
    CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/run.sh)."""
    if backend in ("reference", "cpu"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return torch.device("cpu")
    pytest.skip(f"{backend} needs a GPU here (triton: or TRITON_INTERPRET=1, which tests/run.sh sets)")
