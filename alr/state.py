"""Per-parameter state: created lazily from the algorithm's declaration, restored exactly.

Every tensor a parameter keeps in ``optimizer.state[p]`` is a :class:`~alr.algorithms.
StateStream` of its group's algorithm (or of the low-precision options), plus ``step``, the
0-d float32 step counter torch.optim keeps too. Nothing here names a stream: the
declarations say which exist, their dtypes and how they start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .algorithms import GroupHyper, StateStream

__all__ = ["init_state", "restore_loaded_state"]


def init_state(state: dict[str, Any], p: Tensor, hyper: GroupHyper, rounding_key: Callable[[], int]) -> dict[str, Any]:
    """Create what ``p``'s state lacks under the group's options, in place; returns ``state``.

    Args:
        state: ``optimizer.state[p]``, possibly loaded from a checkpoint (existing tensors
            are kept as they are: the validation layer checks them).
        rounding_key: the stream key of ``p`` (called only when a rounding key is created).
    """
    if "step" not in state:
        # A torch.optim.SGD checkpoint has no step; a state tensor means one was taken.
        started = any(isinstance(state.get(s.name), Tensor) for s in hyper.declaration.streams)
        state["step"] = torch.tensor(float(started), dtype=torch.float32, device=p.device)
    for stream in hyper.streams(p.dtype):
        if state.get(stream.name) is None:
            state[stream.name] = _initial(stream, p, hyper, rounding_key)
    return state


def _initial(stream: StateStream, p: Tensor, hyper: GroupHyper, rounding_key: Callable[[], int]) -> Tensor:
    dtype = stream.dtype_for(p, hyper)
    if stream.init == "key":
        return torch.tensor(rounding_key(), dtype=dtype, device=p.device)
    if stream.init == "param":
        return p.detach().to(dtype, memory_format=torch.preserve_format, copy=True)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def restore_loaded_state(
    state: dict[Tensor, dict[str, Any]],
    params: list[tuple[Tensor, GroupHyper]],
    saved_state: dict[Any, dict[str, Any]],
    saved_ids: list[Any],
) -> None:
    """Finish ``Optimizer.load_state_dict``: every ``step`` becomes a 0-d float32 tensor on
    its parameter's device (torch.optim checkpoints may hold floats or other dtypes), and
    torch's load casts are undone: torch casts every floating state tensor to its
    parameter's dtype; this puts back, exactly, each stream in the dtype its declaration
    gives (float32 master copies, int64 rounding keys, moments kept in a ``state_dtype``).

    Args:
        state: the optimizer's state after torch's load.
        params: each parameter with its group's hyper-parameters, in param-group order.
        saved_state, saved_ids: the loaded state dict's ``state`` and its parameter ids in
            param-group order.
    """
    for saved_id, (p, hyper) in zip(saved_ids, params):
        step = state.get(p, {}).get("step")
        if step is not None:
            state[p]["step"] = torch.as_tensor(step).to(device=p.device, dtype=torch.float32)
        saved = saved_state.get(saved_id, {})
        for stream in hyper.streams(p.dtype):
            value = saved.get(stream.name)
            if isinstance(value, Tensor):
                state[p][stream.name] = value.to(dtype=stream.dtype_for(p, hyper), device=p.device, copy=True)
