"""Triton kernels for alr, installed as ``alr.kernels``.

The sources live in the repository's ``kernels/`` folder; setup.py maps that folder to
``alr.kernels`` (``package_dir``) so that no top-level ``kernels`` package is ever
installed (PyPI has an unrelated one). Triton is optional: nothing here imports it when
this package is imported, and :func:`is_available` says whether it can be used.
"""

from __future__ import annotations

import functools
import importlib

__all__ = ["is_available"]


@functools.cache
def is_available() -> tuple[bool, str | None]:
    """Whether Triton can be imported, as ``(ok, reason)``; ``reason`` is None when ok.

    Only the import is checked: whether a device exists to run the kernels on is the
    caller's question. The answer is computed once per process.
    """
    try:
        importlib.import_module("triton")
    # A broken install (e.g. built for another torch) raises more than ImportError;
    # any failure means the Triton backend cannot be used, and the reason is kept.
    except Exception as exc:  # noqa: BLE001
        return False, f"triton cannot be imported: {type(exc).__name__}: {exc}"
    return True, None
