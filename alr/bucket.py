"""The unit of work a backend receives: one param group's tensors on one (device, dtype)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["Bucket", "GroupHyper", "STAT_FIELDS", "GRAD_STAT_FIELDS", "host_to_device", "is_dense"]

GRAD_STAT_FIELDS = ("grad_sq_sum", "nonfinite")
"""Columns of the per-tensor gradient statistics a backend returns (see ``grad_stats``)."""

STAT_FIELDS = ("dot", "grad_sq", "dir_sq")
"""Columns of the per-tensor hypergradient statistics: ``g·d_prev``, ``g·g``, ``d_prev·d_prev``."""


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory, in some order of its dimensions
    (contiguous, channels-last, transposed, ...), with no gaps or overlaps."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def host_to_device(values: list[int] | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host table as a tensor on ``device``, without synchronising: an asynchronous
    copy from pinned memory (the caching host allocator keeps the buffer until it has run)."""
    table = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)


@dataclass
class Bucket:
    """Parameters of one param group that share a device and a dtype, with their state.

    Every list has one entry per parameter (same order), except the algorithm's unused
    state lists, which are empty. All tensors of one position have the parameter's shape,
    device and dtype, except that the state lists may hold ``GroupHyper.state_dtype`` and
    the master copies are float32; ``steps`` are 0-d float32 tensors on the same device.
    Backends update ``params`` and the state lists in place and never write ``grads``.
    """

    params: list[Tensor]
    grads: list[Tensor]
    steps: list[Tensor]
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)
    momentum_buffers: list[Tensor] = field(default_factory=list)
    prev_directions: list[Tensor] = field(default_factory=list)
    master_params: list[Tensor] = field(default_factory=list)
    """float32 master copies of 16-bit parameters (``master_weights``), else empty."""
    rounding_keys: list[Tensor] = field(default_factory=list)
    """0-d int64 keys of each parameter's random stream (``stochastic_rounding``), else empty."""
    positions: list[int] = field(default_factory=list)
    """Index of each parameter inside its param group (maps per-tensor results back)."""
    _position_index: Tensor | None = field(default=None, repr=False, compare=False)

    def tensor_lists(self) -> tuple[list[Tensor], ...]:
        """The tensor lists in the order of the kernel ops' schemas: params, grads, steps,
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, momentum_buffers, prev_directions,
        master_params (the update ops take ``rounding_keys`` after them)."""
        return (
            self.params,
            self.grads,
            self.steps,
            self.exp_avgs,
            self.exp_avg_sqs,
            self.max_exp_avg_sqs,
            self.momentum_buffers,
            self.prev_directions,
            self.master_params,
        )

    def position_index(self) -> Tensor:
        """``positions`` as an int64 tensor on the bucket's device, made on first use: a
        captured step (CUDA graphs) cannot copy from the host."""
        if self._position_index is None:
            self._position_index = host_to_device(self.positions, torch.int64, self.device)
        return self._position_index

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
    master_weights: bool = False
    stochastic_rounding: bool = False
    state_dtype: torch.dtype | None = None

    def kernel_kwargs(self) -> dict[str, Any]:
        """The kernel ops' hyper-parameter arguments (about 2 µs per call)."""
        beta1, beta2 = self.betas
        return {
            "algorithm": self.algorithm,
            "beta1": float(beta1),
            "beta2": float(beta2),
            "eps": float(self.eps),
            "weight_decay": float(self.weight_decay),
            "decoupled_weight_decay": bool(self.decoupled_weight_decay),
            "amsgrad": bool(self.amsgrad),
            "maximize": bool(self.maximize),
            "momentum": float(self.momentum),
            "dampening": float(self.dampening),
            "nesterov": bool(self.nesterov),
            "needs_prev_direction": bool(self.needs_prev_direction),
        }

    @property
    def adapts(self) -> bool:
        return self.hypergrad != "off"

    @property
    def state_layout(self) -> tuple:
        """The options that decide which state tensors a parameter has."""
        return (
            self.algorithm,
            self.amsgrad,
            self.momentum != 0,
            self.needs_prev_direction,
            self.master_weights,
            self.stochastic_rounding,
            self.state_dtype,
        )

    @property
    def needs_prev_direction(self) -> bool:
        """SGD keeps ``d_{t-1}`` in an extra buffer unless it is the momentum buffer itself."""
        return self.adapts and self.algorithm == "sgd" and (self.momentum == 0 or self.nesterov)
