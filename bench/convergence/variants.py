"""Optimizer variants: the torch-identical baseline and ALR configurations.

A variant is a name plus keyword arguments for :class:`alr.ALROptimizer`. The baseline is
alr's drop-in class (``alr.Adam``/``AdamW``/``SGD``: adaptation off, which is torch.optim
exactly). ALR variants only pass the settings they change, so ``mult`` always measures the
package's current defaults. A setting's value may be a dict keyed by algorithm (``adam``,
``adamw``, ``sgd``) when it depends on the algorithm, e.g. the additive rule's β.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import alr

ALGORITHMS = ("adam", "adamw", "sgd")
SGD_MOMENTUM = 0.9
BACKEND = "reference"
"""Passed explicitly: it is the only backend here, and naming it avoids the fallback warning."""

RESOLVED_KEYS = (
    "hypergrad",
    "hypergrad_lr",
    "hypergrad_norm_decay",
    "hypergrad_scope",
    "hypergrad_exact",
    "kappa_min",
    "kappa_max",
)
"""The ALR settings a report shows for every variant, as the optimizer resolved them."""


@dataclass(frozen=True)
class Variant:
    """One optimizer configuration of the sweep.

    Attributes:
        name: the label in tables, plots and JSON.
        options: keyword arguments for :class:`alr.ALROptimizer`; a dict value keyed by
            algorithm is resolved per algorithm. Empty for the baseline.
        baseline: use the drop-in class (hypergrad off, nonfinite steps not skipped).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False

    def options_for(self, algorithm: str) -> dict[str, Any]:
        """``options`` with every per-algorithm dict replaced by this algorithm's value."""
        resolved = {}
        for key, value in self.options.items():
            if isinstance(value, dict):
                if algorithm not in value:
                    raise ValueError(f"variant {self.name!r}: {key} has no value for {algorithm!r}")
                value = value[algorithm]
            resolved[key] = value
        return resolved


BUILTIN_VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("baseline", baseline=True),
        Variant("mult"),
        Variant("mult-tensor", {"hypergrad_scope": "tensor"}),
        Variant("mult-exact", {"hypergrad_exact": True}),
        Variant("add", {"hypergrad": "add"}),
        Variant("add-tensor", {"hypergrad": "add", "hypergrad_scope": "tensor"}),
        Variant("add-exact", {"hypergrad": "add", "hypergrad_exact": True}),
    )
}
"""``mult`` is the package default; ``add`` uses the package's per-algorithm β (the paper's
1e-7 for Adam, 1e-3 for SGD)."""

QUICK_VARIANTS = ("baseline", "mult")


def parse_alr_config(text: str) -> Variant:
    """A variant from ``--alr-config`` JSON, e.g. ``{"hypergrad_lr": 0.05, "kappa_max": 1e4}``.

    An optional ``"name"`` key labels it; otherwise the label lists the settings. The
    settings are checked by building an optimizer for every algorithm they apply to.
    """
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--alr-config is not valid JSON: {text!r} ({error})") from None
    if not isinstance(options, dict):
        raise TypeError(f"--alr-config must be a JSON object: {text!r}")
    name = options.pop("name", None) or _label(options)
    variant = Variant(str(name), options)
    for algorithm in ALGORITHMS:
        if all(not isinstance(v, dict) or algorithm in v for v in options.values()):
            resolved_settings(variant, algorithm)
    return variant


def _label(options: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
        return f"{value:g}" if isinstance(value, float) else str(value)

    return " ".join(f"{key}={show(value)}" for key, value in options.items()) or "alr"


def make_optimizer(variant: Variant, algorithm: str, params: list[nn.Parameter], lr: float) -> alr.ALROptimizer:
    """The optimizer of ``variant`` for ``algorithm`` at initial learning rate ``lr``.

    SGD always uses heavy-ball momentum 0.9; every other setting is the class default
    (AdamW: weight decay 1e-2; Adam and SGD: no weight decay).
    """
    extra = {"momentum": SGD_MOMENTUM} if algorithm == "sgd" else {}
    if variant.baseline:
        cls = {"adam": alr.Adam, "adamw": alr.AdamW, "sgd": alr.SGD}[algorithm]
        return cls(params, lr=lr, backend=BACKEND, **extra)
    options = {**extra, **variant.options_for(algorithm)}
    return alr.ALROptimizer(params, lr, algorithm=algorithm, backend=BACKEND, **options)


def resolved_settings(variant: Variant, algorithm: str) -> dict[str, Any]:
    """The ALR settings the optimizer of ``variant`` actually runs with (defaults filled in)."""
    opt = make_optimizer(variant, algorithm, [nn.Parameter(torch.zeros(1))], 1e-3)
    group = opt.param_groups[0]
    return {key: group[key] for key in RESOLVED_KEYS}
