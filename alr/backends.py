"""Backend names, availability and resolution: the only module that knows the backends.

A backend is a module exposing ``grad_stats``, ``hypergrad_stats`` and ``update`` with the
signatures of :mod:`alr.reference`, which is always available and is the oracle.

Resolution, per (device, dtype) bucket:

* ``"auto"`` picks the first available backend of ``_AUTO_ORDER`` for the device and dtype
  (CPU: ``cpu``; CUDA: ``cuda``, then ``triton``; both GPU backends take 16- and 32-bit
  parameters only) and falls back to ``reference`` with a one-time
  :class:`ALRBackendFallbackWarning` giving the reason. The CUDA order puts the CUDA C++
  kernels first because they need no JIT compilation and no device tables; it is to be
  confirmed or swapped by ``python -m bench --device cuda`` (``tests/gpu_check.sh``);
* an explicit name that is unavailable raises, with the reason;
* the ``ALR_BACKEND`` environment variable replaces the default ``"auto"``.

``triton`` also runs on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter: slow,
for testing the kernels without a GPU); ``"auto"`` never picks it there.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import ModuleType
from typing import Literal

import torch

from . import _extension, reference

__all__ = [
    "BACKENDS",
    "ALRBackendFallbackWarning",
    "available_backends",
    "backend_unavailable_reason",
    "check_backend_name",
    "resolve",
]

BackendName = Literal["auto", "reference", "cpu", "cuda", "triton"]
BACKENDS: tuple[str, ...] = ("reference", "cpu", "cuda", "triton")
_DEVICE_TYPES = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}
_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPES = {"cuda": _GPU_DTYPES, "triton": _GPU_DTYPES}
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
_ENV_VAR = "ALR_BACKEND"

_warned_fallbacks: set[str] = set()


class ALRBackendFallbackWarning(UserWarning):
    """``backend="auto"`` found no native kernel for a device and used the reference."""


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (``reference`` always)."""
    return [name for name in BACKENDS if backend_unavailable_reason(name) is None]


def backend_unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    check_backend_name(name)
    if name == "reference":
        return None
    if name == "triton":
        ok, reason = _triton_available()
        return reason
    error = _extension.cpu_extension_error() if name == "cpu" else _extension.cuda_extension_error()
    if error is not None:
        return error
    key = name.upper()
    if _ops_registered(key):
        return None
    return f"the alr extension registered no {key} kernels for the alr ops"


_cpu_ops: bool | None = None
_cuda_ops: bool | None = None


def _ops_registered(dispatch_key: str) -> bool:
    """Whether the extensions registered every alr op for ``dispatch_key`` ("CPU" or
    "CUDA"); checked once per key, since resolution runs every step, and kept in plain
    globals, which ``torch.compile`` reads as constants."""
    global _cpu_ops, _cuda_ops
    from . import _native

    if dispatch_key == "CPU":
        if _cpu_ops is None:
            _cpu_ops = _native.ops_available("CPU")
        return _cpu_ops
    if _cuda_ops is None:
        _cuda_ops = _native.ops_available("CUDA")
    return _cuda_ops


_triton_status: tuple[bool, str | None] | None = None


def _triton_available() -> tuple[bool, str | None]:
    """Whether Triton imports (checked once, and kept in a plain global, which
    ``torch.compile`` reads as a constant instead of tracing the import again)."""
    global _triton_status
    if _triton_status is None:
        from alr import kernels  # installed from kernels/; imports no Triton by itself

        _triton_status = kernels.is_available()
    return _triton_status


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r}. Expected 'auto' or one of {list(BACKENDS)}")


def default_backend() -> str:
    """``ALR_BACKEND`` if set, else ``"auto"``."""
    name = os.environ.get(_ENV_VAR, "auto")
    check_backend_name(name)
    return name


def check_device(name: str, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Raise when an explicitly named backend cannot handle tensors on ``device`` (of ``dtype``)."""
    allowed = _DEVICE_TYPES.get(name)
    if name == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        allowed = ("cuda", "cpu")
    if allowed is not None and device.type not in allowed:
        raise ValueError(
            f"backend={name!r} runs on {' or '.join(allowed)} tensors, but a parameter is on {device}"
        )
    dtypes = _DTYPES.get(name)
    if dtype is not None and dtypes is not None and dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"backend={name!r} takes {names} parameters, but a parameter is {dtype}")


def resolve(requested: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The implementation module for one bucket of ``dtype`` tensors on ``device``."""
    name = default_backend() if requested == "auto" else requested
    if name != "auto":
        check_device(name, device, dtype)
        reason = backend_unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(f"alr backend {name!r} is unavailable: {reason}")
        return _module(name)
    for candidate in _AUTO_ORDER.get(device.type, ()):
        if backend_unavailable_reason(candidate) is None and dtype in _DTYPES.get(candidate, (dtype,)):
            return _module(candidate)
    _warn_fallback(device)
    return reference


def _module(name: str) -> ModuleType:
    if name == "reference":
        return reference
    if name in ("cpu", "cuda"):
        # The same alr ops; the dispatcher picks the CPU or CUDA kernel by the tensors' device.
        from . import _native

        return _native
    if name == "triton":
        from . import _triton

        return _triton
    raise AssertionError(f"backend {name!r} reported available but has no module")


def _warn_fallback(device: torch.device) -> None:
    if device.type in _warned_fallbacks or device.type not in _AUTO_ORDER:
        return
    _warned_fallbacks.add(device.type)
    reasons = "; ".join(f"{name}: {backend_unavailable_reason(name)}" for name in _AUTO_ORDER[device.type])
    warnings.warn(
        f"alr: no native backend for {device.type} tensors ({reasons}); using the pure-PyTorch 'reference' backend",
        ALRBackendFallbackWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside alr and torch.

    ``step()`` reaches here through torch's hook and no-grad wrappers and several alr
    frames, whose number depends on the Python version.
    """
    internal = tuple(os.path.dirname(m.__file__) for m in (torch, sys.modules["alr"]))
    level, frame = 2, sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        level, frame = level + 1, frame.f_back
    return level
