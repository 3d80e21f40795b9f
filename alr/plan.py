"""The plan cache: each param group's bucketing, built once and reused while it holds.

Bucketing touches every parameter's state in Python (creating what is missing, about 3 µs
per parameter) and validates every tensor, so it is redone only when what it was built
from changes. Per step only the gradients are collected and checked.

**Invalidation rule.** A group's plan is rebuilt at the next step when any of these differs
from when it was built:

* the param-group dict itself (a group replaced in ``param_groups``);
* which of the group's parameters have a gradient;
* the options that decide which state tensors exist (:attr:`GroupHyper.state_layout`) and
  the group's ``backend``;
* the optimizer's state: the ``state`` mapping object, its number of entries, or its
  version, which :meth:`PlanCache.invalidate` advances (``load_state_dict`` calls it).

Replacing a parameter's storage, a state tensor or a parameter list in place, by hand, is
not (yet) followed; a gradient whose shape, dtype or device differs from its parameter's is
caught by the per-step check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import backends
from .algorithms import GroupHyper
from .bucket import Bucket
from .distributed import local_tensor
from .state import init_state
from .validation import check_bucket, check_grads, parameter_name

__all__ = ["PlanCache", "bucket_group"]


@dataclass
class GroupPlan:
    """A param group's buckets, valid while ``key`` (see :meth:`PlanCache.buckets`) holds."""

    group: dict[str, Any]
    key: tuple
    buckets: list[Bucket]


class PlanCache:
    """The plans of an optimizer's param groups (see the module docstring for when a plan
    is rebuilt)."""

    def __init__(self) -> None:
        self._plans: dict[int, GroupPlan] = {}
        self._version = 0

    def invalidate(self) -> None:
        """Rebuild every plan at the next step (the state was replaced or loaded)."""
        self._version += 1

    def buckets(
        self,
        group: dict[str, Any],
        hyper: GroupHyper,
        grads: list[Tensor | None],
        state: dict[Tensor, dict[str, Any]],
        build: Callable[[], list[Bucket]],
    ) -> list[Bucket]:
        """The group's buckets with this step's gradients (``grads``: local tensors, one per
        parameter of the group, None where it has none); ``build`` makes new buckets (it may
        add state, so the key is taken after it)."""
        plan = self._plans.get(id(group))
        if plan is None or plan.group is not group or plan.key != self._key(group, hyper, grads, state):
            buckets = build()
            self._plans[id(group)] = GroupPlan(group, self._key(group, hyper, grads, state), buckets)
            return buckets
        for bucket in plan.buckets:
            bucket.grads = [grads[i] for i in bucket.positions]
            check_grads(bucket.params, bucket.grads, bucket.names)
        return plan.buckets

    def _key(self, group: dict[str, Any], hyper: GroupHyper, grads: list[Tensor | None], state: dict) -> tuple:
        return (
            tuple(g is not None for g in grads),
            hyper.state_layout,
            group["backend"],
            id(state),
            len(state),
            self._version,
        )


def bucket_group(
    group: dict[str, Any],
    group_index: int,
    hyper: GroupHyper,
    state: dict[Tensor, dict[str, Any]],
    rounding_key: Callable[[int], int],
) -> list[Bucket]:
    """Lazily initialise the state of the group's parameters that have gradients, bucket
    them by (device, dtype) and validate every bucket.

    Args:
        state: the optimizer's ``state`` (a defaultdict of per-parameter dicts).
        rounding_key: the stochastic-rounding key of the parameter at a position.
    """
    buckets: dict[tuple[torch.device, torch.dtype], Bucket] = {}
    params = group["params"]
    names = [parameter_name(group, group_index, i) for i in range(len(params))]
    check_grads(params, [p.grad for p in params], names)
    for position, p in enumerate(params):
        if p.grad is None:
            continue
        if group["backend"] != "auto":
            backends.check_device(group["backend"], p.device, p.dtype)
        p_state = init_state(state[p], p, hyper, lambda: rounding_key(position))
        # A DTensor (FSDP2) is stepped through its local shard, which shares its storage.
        local = local_tensor(p)
        bucket = buckets.setdefault((local.device, local.dtype), Bucket([], [], []))
        bucket.params.append(local)
        bucket.grads.append(local_tensor(p.grad))
        bucket.steps.append(p_state["step"])
        bucket.positions.append(position)
        bucket.names.append(names[position])
        for stream in hyper.streams(p.dtype):
            value = p_state[stream.name]
            bucket.state.setdefault(stream.name, []).append(local_tensor(value) if stream.elementwise else value)
    for bucket in buckets.values():
        check_bucket(bucket, hyper)
    return list(buckets.values())
