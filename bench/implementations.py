"""The optimizer implementations compared in each (algorithm, variant) group.

Every implementation is a factory that takes the parameters (with ``.grad`` set) and
returns the callable to time: one optimizer step, plus ``clip_grad_norm_`` for baselines in
the ``clip`` variant. All of them run the same algorithm with the same hyper-parameters:

* ``torch``: ``torch.optim.Adam``, ``AdamW`` and ``SGD(momentum=0.9)`` in their for-loop
  (``foreach=False``), ``foreach=True`` and ``fused=True`` forms;
* ``alr``: the drop-ins ``alr.Adam``/``AdamW``/``SGD`` on each alr backend, and for the
  ``hypergrad`` variant ``alr.ALROptimizer(hypergrad="mult")``;
* ``peer``: other fused optimizers, only where importable (never installed by us):
  DeepSpeed's ``DeepSpeedCPUAdam`` on CPU, apex and TransformerEngine ``FusedAdam`` on CUDA.

Variants:

* ``plain``: the drop-in step.
* ``clip``: global-norm clipping to 1.0. Baselines time
  ``torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)`` followed by their step;
  alr does it inside the step (``max_grad_norm=1.0``).
* ``hypergrad``: alr with ``hypergrad="mult"`` (one-pass). torch has no such step, so the
  baseline is the plain torch step. ``skip_nonfinite`` is turned off so that the variant
  differs from ``plain`` only by the adaptation (the nonfinite check would add a
  read-only pre-pass over the gradients, which ``clip`` already measures).
* ``defaults``: ``alr.ALROptimizer`` with its own defaults (the nonfinite pre-pass and the
  one-pass hypergradient on): what a user gets without choosing anything, against the
  plain torch step.

Low-precision variants (asked for by name with ``--variant``; torch.optim has none of
them, so they too are compared with the plain torch step of the same ``--dtype``):

* ``bf16-state``: the drop-in with ``state_dtype=torch.bfloat16`` (for float32 parameters:
  half the state memory and traffic);
* ``master``: ``master_weights=True`` (16-bit ``--dtype`` only), float32 master and state;
* ``stochastic``: ``stochastic_rounding=True`` (``--dtype bfloat16`` only), float32 state.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import alr
from alr import backends as alr_backends

__all__ = ["ALGORITHMS", "DEFAULT_VARIANTS", "PLAIN_BASELINE_VARIANTS", "VARIANTS", "Impl", "StepFn", "device_backends", "implementations"]

ALGORITHMS = ("adam", "adamw", "sgd")
DEFAULT_VARIANTS = ("plain", "clip", "hypergrad", "defaults")
LOW_PRECISION_VARIANTS = {
    "bf16-state": {"state_dtype": torch.bfloat16},
    "master": {"master_weights": True},
    "stochastic": {"stochastic_rounding": True},
}
"""The drop-in's extra options in each low-precision variant."""
VARIANTS = (*DEFAULT_VARIANTS, *LOW_PRECISION_VARIANTS)
PLAIN_BASELINE_VARIANTS = ("hypergrad", "defaults", *LOW_PRECISION_VARIANTS)
"""Variants torch has no step for: they are compared with the plain torch step."""

LR = 1e-4
"""Small, so that parameters stay finite and well away from overflow over thousands of steps."""
MAX_GRAD_NORM = 1.0
MOMENTUM = 0.9

StepFn = Callable[[], object]
Factory = Callable[[list[Tensor]], StepFn]


@dataclass(frozen=True)
class Impl:
    """One implementation in a group; ``unavailable`` says why it cannot run here."""

    name: str
    kind: str  # "torch", "alr" or "peer"
    make: Factory | None
    unavailable: str | None = None


def _hyper(algorithm: str) -> dict[str, Any]:
    """torch's constructor keywords for ``algorithm`` (AdamW keeps its default decay 1e-2)."""
    return {"lr": LR, "momentum": MOMENTUM} if algorithm == "sgd" else {"lr": LR}


_TORCH_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
_ALR_CLASSES = {"adam": alr.Adam, "adamw": alr.AdamW, "sgd": alr.SGD}
_TORCH_FORMS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def implementations(
    algorithm: str, variant: str, device: torch.device, backends: list[str] | None
) -> list[Impl]:
    """The implementations of one group, baselines first.

    Args:
        backends: alr backends to include; None means every available backend that runs
            on ``device``. A named backend that cannot run is kept, as unavailable.
    """
    impls = []
    if variant not in PLAIN_BASELINE_VARIANTS:
        impls += [_torch_impl(algorithm, form, variant) for form in _TORCH_FORMS]
        impls += _peer_impls(algorithm, variant, device)
    impls += [_alr_impl(algorithm, variant, name, device) for name in backends or device_backends(device)]
    return impls


def device_backends(device: torch.device) -> list[str]:
    """Every available alr backend that runs on ``device``."""
    names = []
    for name in alr.available_backends():
        if name == "triton" and device.type == "cpu":
            continue  # Triton's interpreter (TRITON_INTERPRET=1) runs CPU tensors, for tests only
        try:
            alr_backends.check_device(name, device)
        except ValueError:
            continue
        names.append(name)
    return names


def _with_clip(opt: torch.optim.Optimizer, params: list[Tensor]) -> StepFn:
    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
        opt.step()

    return step


def _baseline_step(opt: torch.optim.Optimizer, params: list[Tensor], variant: str) -> StepFn:
    return _with_clip(opt, params) if variant == "clip" else opt.step


def _torch_impl(algorithm: str, form: str, variant: str) -> Impl:
    cls = _TORCH_CLASSES[algorithm]

    def make(params: list[Tensor]) -> StepFn:
        return _baseline_step(cls(params, **_hyper(algorithm), **_TORCH_FORMS[form]), params, variant)

    return Impl(f"torch {form}", "torch", make)


def _alr_impl(algorithm: str, variant: str, backend: str, device: torch.device) -> Impl:
    name = f"alr {backend}"
    reason = alr_backends.backend_unavailable_reason(backend)
    if reason is None:
        try:
            alr_backends.check_device(backend, device)
        except ValueError as exc:
            reason = str(exc)
    if reason is not None:
        return Impl(name, "alr", None, reason)

    def make(params: list[Tensor]) -> StepFn:
        if variant == "hypergrad":
            opt = alr.ALROptimizer(
                params,
                algorithm=algorithm,
                hypergrad="mult",
                skip_nonfinite=False,
                backend=backend,
                **_hyper(algorithm),
            )
        elif variant == "defaults":
            opt = alr.ALROptimizer(params, algorithm=algorithm, backend=backend, **_hyper(algorithm))
        elif variant in LOW_PRECISION_VARIANTS:
            _check_low_precision_dtype(variant, params[0].dtype)
            opt = _ALR_CLASSES[algorithm](params, backend=backend, **_hyper(algorithm), **LOW_PRECISION_VARIANTS[variant])
        else:
            extra = {"max_grad_norm": MAX_GRAD_NORM} if variant == "clip" else {}
            opt = _ALR_CLASSES[algorithm](params, backend=backend, **_hyper(algorithm), **extra)
        return opt.step

    return Impl(name, "alr", make)


def _check_low_precision_dtype(variant: str, dtype: torch.dtype) -> None:
    """Master weights exist for 16-bit parameters, stochastic rounding for bfloat16 ones:
    elsewhere the variant would time the plain step under another name."""
    if variant == "master" and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("master weights are kept for 16-bit parameters: run with --dtype bfloat16 or float16")
    if variant == "stochastic" and dtype != torch.bfloat16:
        raise ValueError("stochastic rounding rounds bfloat16 parameters: run with --dtype bfloat16")


def _peer_impls(algorithm: str, variant: str, device: torch.device) -> list[Impl]:
    """Other libraries' fused Adam, on the device each one targets."""
    if algorithm == "sgd":
        return []
    weight_decay = 1e-2 if algorithm == "adamw" else 0.0
    decoupled = algorithm == "adamw"
    if device.type == "cpu":
        return [
            _peer(
                "deepspeed cpu-adam",
                "deepspeed",
                "deepspeed.ops.adam",
                "DeepSpeedCPUAdam",
                {"lr": LR, "weight_decay": weight_decay, "adamw_mode": decoupled},
                variant,
            )
        ]
    if device.type == "cuda":
        kwargs = {"lr": LR, "weight_decay": weight_decay, "adam_w_mode": decoupled}
        return [
            _peer("apex fused-adam", "apex", "apex.optimizers", "FusedAdam", kwargs, variant),
            _peer(
                "te fused-adam",
                "transformer_engine",
                "transformer_engine.pytorch.optimizers",
                "FusedAdam",
                kwargs,
                variant,
            ),
        ]
    return []


def _peer(name: str, package: str, module: str, attribute: str, kwargs: dict[str, Any], variant: str) -> Impl:
    """A peer optimizer, imported only when its package is installed."""
    if importlib.util.find_spec(package) is None:
        return Impl(name, "peer", None, f"{package} is not installed")
    try:
        # Some of these print banners on import; stdout is reserved for the results table.
        with contextlib.redirect_stdout(sys.stderr):
            cls = getattr(importlib.import_module(module), attribute)
    except Exception as exc:  # noqa: BLE001 (a broken optional install must not stop the benchmark)
        return Impl(name, "peer", None, f"cannot import {module}.{attribute}: {type(exc).__name__}: {exc}")

    def make(params: list[Tensor]) -> StepFn:
        with contextlib.redirect_stdout(sys.stderr):  # e.g. DeepSpeed's op-builder messages
            opt = cls(params, **kwargs)
        return _baseline_step(opt, params, variant)

    return Impl(name, "peer", make)
