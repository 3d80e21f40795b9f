"""Per-parameter state: created lazily from the algorithm's declaration, restored exactly.

Every tensor a parameter keeps in ``optimizer.state[p]`` is a :class:`~alr.algorithms.
StateStream` of its group's algorithm (or of the low-precision options), plus ``step``, the
0-d float32 step counter torch.optim keeps too. Nothing here names a stream: the
declarations say which exist, their dtypes and how they start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .algorithms import ALGORITHMS, GroupHyper, StateStream, algorithm_of
from .validation import parameter_name

__all__ = ["check_loaded_state", "init_state", "restore_loaded_state"]


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


def check_loaded_state(saved_state: dict[Any, Any], saved_groups: list[dict[str, Any]], public_name: str) -> None:
    """Raise, before anything is loaded, for a state dict of another algorithm (a state key
    that only another declaration has) or a step that is negative or not finite.

    Args:
        saved_state, saved_groups: the loaded state dict's ``state`` and ``param_groups``.
        public_name: the optimizer's ``algorithm`` (``"adam"``, ``"adamw"``, ``"sgd"``).
    """
    own = {stream.name for stream in algorithm_of(public_name).streams}
    foreign = {s.name: a.name for a in ALGORITHMS.values() for s in a.streams if s.name not in own}
    for group_index, group in enumerate(saved_groups):
        for position, saved_id in enumerate(group["params"]):
            entry = saved_state.get(saved_id, {})
            name = parameter_name(group, group_index, position)
            if not isinstance(entry, dict):
                raise ValueError(f"alr: the saved state of {name} is a {type(entry).__name__}, not a dict")
            for key in entry:
                if key in foreign:
                    raise ValueError(
                        f"alr: the saved state of {name} holds {key!r}, which {foreign[key]} keeps and "
                        f"{public_name} does not: a state dict of another optimizer?"
                    )
            if "step" in entry:
                step = entry["step"]
                try:
                    value = float(step)
                except (TypeError, ValueError, RuntimeError):
                    raise ValueError(f"alr: the saved step of {name} is not a number: {step!r}") from None
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"alr: the saved step of {name} is {value}; a step count is finite and >= 0")
