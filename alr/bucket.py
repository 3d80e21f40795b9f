"""The unit of work a backend receives: one param group's tensors on one (device, dtype)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Bucket", "GroupHyper", "STAT_FIELDS", "GRAD_STAT_FIELDS"]

GRAD_STAT_FIELDS = ("grad_sq_sum", "nonfinite")
"""Columns of the per-tensor gradient statistics a backend returns (see ``grad_stats``)."""

STAT_FIELDS = ("dot", "grad_sq", "dir_sq")
"""Columns of the per-tensor hypergradient statistics: ``g·d_prev``, ``g·g``, ``d_prev·d_prev``."""


@dataclass
class Bucket:
    """Parameters of one param group that share a device and a dtype, with their state.

    Every list has one entry per parameter (same order), except the algorithm's unused
    state lists, which are empty. All tensors of one position have the parameter's shape,
    device and dtype; ``steps`` are 0-d float32 tensors on the same device. Backends update
    ``params`` and the state lists in place and never write ``grads``.
    """

    params: list[Tensor]
    grads: list[Tensor]
    steps: list[Tensor]
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)
    momentum_buffers: list[Tensor] = field(default_factory=list)
    prev_directions: list[Tensor] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    """Index of each parameter inside its param group (maps per-tensor results back)."""

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def __len__(self) -> int:
        return len(self.params)


@dataclass(frozen=True)
class GroupHyper:
    """The hyper-parameters of one param group, as a backend sees them.

    ``lr`` is the param group's learning rate (a float, or a 1-element tensor). The effective
    learning rate ``alpha = kappa * lr`` reaches the backend separately, as a tensor.
    """

    algorithm: Literal["adam", "sgd"]
    lr: float | Tensor
    weight_decay: float
    maximize: bool
    decoupled_weight_decay: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    hypergrad: Literal["mult", "add", "off"] = "off"
    hypergrad_lr: float = 0.0
    hypergrad_norm_decay: float = 0.0
    hypergrad_scope: Literal["group", "tensor"] = "group"
    hypergrad_exact: bool = False
    kappa_min: float = 1e-3
    kappa_max: float = 1e5

    @property
    def adapts(self) -> bool:
        return self.hypergrad != "off"

    @property
    def state_layout(self) -> tuple:
        """The options that decide which state tensors a parameter has."""
        return (self.algorithm, self.amsgrad, self.momentum != 0, self.needs_prev_direction)

    @property
    def needs_prev_direction(self) -> bool:
        """SGD keeps ``d_{t-1}`` in an extra buffer unless it is the momentum buffer itself."""
        return self.adapts and self.algorithm == "sgd" and (self.momentum == 0 or self.nesterov)
