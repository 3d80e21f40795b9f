"""Drop-in replacements with exactly torch.optim's constructor signatures and defaults.

``alr.Adam``, ``alr.AdamW`` and ``alr.SGD`` are :class:`~alr.ALROptimizer` configured like
their torch namesakes: the adaptation is off (``hypergrad="off"``) and nonfinite steps are
not skipped, so they follow torch's trajectory. Every ALR option (``hypergrad``,
``max_grad_norm``, ``skip_nonfinite``, ``backend``, ...) can be passed as a keyword.

torch's implementation flags are accepted with the closest meaning: ``foreach`` and
``fused`` do not choose an implementation (alr always runs its fused multi-tensor step for
the selected ``backend``) but keep torch's validation; ``capturable`` is always in effect;
``differentiable=True`` raises, since the fused step builds no autograd graph.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from .optimizer import ALROptimizer

__all__ = ["Adam", "AdamW", "SGD"]

_DROP_IN = {"hypergrad": "off", "skip_nonfinite": False}


class Adam(ALROptimizer):
    """``torch.optim.Adam`` on alr's fused step (see the module docstring)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        **alr_options: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            algorithm="adamw" if decoupled_weight_decay else "adam",
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            **{**_DROP_IN, **alr_options},
        )


class AdamW(Adam):
    """``torch.optim.AdamW`` on alr's fused step (see the module docstring)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        **alr_options: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            **alr_options,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class SGD(ALROptimizer):
    """``torch.optim.SGD`` on alr's fused step (see the module docstring)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        **alr_options: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            algorithm="sgd",
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            **{**_DROP_IN, **alr_options},
        )
