"""Guarded, lazy loading of alr's compiled extensions.

``alr._C`` holds the op schemas and the CPU kernels and is always built; ``alr._C_cuda``
holds the CUDA kernels and is built only where setup.py's CUDA gate passes. Neither is
imported until first asked for, so importing this module never fails and queries no
device. A failed import is remembered with its reason, so that an explicit request for a
native backend can raise with that reason instead of a bare ImportError.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = [
    "build_info",
    "cpu_extension_error",
    "cuda_extension_error",
    "load_cpu_extension",
    "load_cuda_extension",
]

_CPU_MODULE = "alr._C"
_CUDA_MODULE = "alr._C_cuda"

_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}

# What build_info() reports for a module that did not load: nothing compiled.
_NOTHING_BUILT: dict[str, Any] = {
    "version": None,
    "torch_version": None,
    "cxx_compiler": None,
    "openmp": False,
    "cpu_kernels": [],
    "cuda": False,
}


def _load(name: str) -> ModuleType | None:
    """Imports ``name`` once; later calls return the cached module or None."""
    if name not in _modules:
        try:
            # The extensions link against libtorch, which `import torch` loads.
            importlib.import_module("torch")
            _modules[name] = importlib.import_module(name)
        except ImportError as exc:
            _modules[name] = None
            _errors[name] = _describe(name, exc)
    return _modules[name]


def _describe(name: str, exc: ImportError) -> str:
    """The reason ``name`` did not import, worded for a user choosing a backend."""
    if isinstance(exc, ModuleNotFoundError) and exc.name == name:
        return f"{name} was not built here; `pip install --no-build-isolation -v -e .` says why"
    return f"{name} failed to import: {type(exc).__name__}: {exc}"


def load_cpu_extension() -> ModuleType | None:
    """``alr._C`` (op schemas and CPU kernels), or None when it cannot be imported."""
    return _load(_CPU_MODULE)


def load_cuda_extension() -> ModuleType | None:
    """``alr._C_cuda`` (CUDA kernels), or None when it cannot be imported.

    ``alr._C`` is loaded first because it defines the op schemas the CUDA kernels implement.
    """
    load_cpu_extension()
    return _load(_CUDA_MODULE)


def cpu_extension_error() -> str | None:
    """Why ``alr._C`` could not be imported, or None when it was."""
    load_cpu_extension()
    return _errors.get(_CPU_MODULE)


def cuda_extension_error() -> str | None:
    """Why ``alr._C_cuda`` could not be imported, or None when it was."""
    load_cuda_extension()
    return _errors.get(_CUDA_MODULE)


def build_info() -> dict[str, Any]:
    """What the compiled extensions provide, for bug reports and CI logs.

    The keys of ``alr._C.build_info()`` (``version``, ``torch_version``, ``cxx_compiler``,
    ``openmp``, ``cpu_kernels``, ``cuda``), overlaid by ``alr._C_cuda.build_info()`` where
    that module loads and has one, plus ``cpu_extension`` and ``cuda_extension`` (whether
    each module imported) and ``errors`` (``"cpu"``/``"cuda"`` to the import failure).
    """
    cpu = load_cpu_extension()
    cuda = load_cuda_extension()
    info = dict(_NOTHING_BUILT)
    if cpu is not None:
        info.update(cpu.build_info())
    if cuda is not None and hasattr(cuda, "build_info"):
        info.update(cuda.build_info())
    errors = {"cpu": cpu_extension_error(), "cuda": cuda_extension_error()}
    info["cpu_extension"] = cpu is not None
    info["cuda_extension"] = cuda is not None
    info["errors"] = {key: reason for key, reason in errors.items() if reason is not None}
    return info
