"""The unit of work a backend receives: one param group's tensors on one (device, dtype)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .algorithms import GRAD_STATS, HYPERGRAD_STATS, MASTER_PARAM, ROUNDING_KEY, GroupHyper

__all__ = ["Bucket", "GroupHyper", "STAT_FIELDS", "GRAD_STAT_FIELDS", "host_to_device", "is_dense"]

GRAD_STAT_FIELDS = GRAD_STATS
"""Columns of the per-tensor gradient statistics a backend returns (see ``grad_stats``)."""

STAT_FIELDS = HYPERGRAD_STATS
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

    ``params``, ``grads``, ``steps``, ``positions`` and every list of ``state`` have one
    entry per parameter, in the same order. ``state`` maps the name of each state stream the
    group's options keep (:meth:`GroupHyper.streams`, the algorithm's declaration) to its
    tensors: shaped like their parameters, on their device, in the stream's dtype rule (the
    rounding keys are 0-d int64). ``steps`` are 0-d float32 tensors on the same device.
    Backends update ``params`` and the state in place and never write ``grads``.
    """

    params: list[Tensor]
    grads: list[Tensor]
    steps: list[Tensor]
    state: dict[str, list[Tensor]] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    """Index of each parameter inside its param group (maps per-tensor results back)."""
    names: list[str] = field(default_factory=list)
    """How errors name each parameter (its ``param_names`` entry, else ``params[i]``)."""
    _position_index: Tensor | None = field(default=None, repr=False, compare=False)

    def stream(self, name: str) -> list[Tensor]:
        """The tensors of state stream ``name``; empty when the group keeps none."""
        return self.state.get(name, [])

    @property
    def master_params(self) -> list[Tensor]:
        """float32 master copies of 16-bit parameters (``master_weights``), else empty."""
        return self.stream(MASTER_PARAM)

    @property
    def rounding_keys(self) -> list[Tensor]:
        """0-d int64 keys of each parameter's random stream (``stochastic_rounding``), else empty."""
        return self.stream(ROUNDING_KEY)

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
