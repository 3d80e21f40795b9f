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

Each step also checks that the gradients have the shapes, dtype, device and (dense) layout
the plan was validated with; when they do not (a parameter resized through ``p.data``, a
gradient replaced through ``p.grad.data``), the plan is rebuilt, which validates every
tensor again and raises naming what differs. Replacing a state tensor or a parameter list
in place, by hand, is not (yet) followed.
"""

from __future__ import annotations

import operator
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
    """A param group's buckets, valid while ``key`` (see :meth:`PlanCache.buckets`) holds and
    each step's gradients have the shapes (``shapes``, per bucket), dtype, device and layout
    the buckets were validated with."""

    group: dict[str, Any]
    key: tuple
    buckets: list[Bucket]
    shapes: list[list[torch.Size]]

    def take_grads(self, grads: list[Tensor | None]) -> bool:
        """Give every bucket this step's gradients, if they are as validated (four C-level
        maps per bucket: ~0.3 µs per tensor, against ~0.6 µs for checking each tensor in a
        Python loop); False, assigning nothing, if any is not."""
        fresh = [[grads[i] for i in bucket.positions] for bucket in self.buckets]
        for bucket, shapes, bucket_grads in zip(self.buckets, self.shapes, fresh):
            if list(map(_shape, bucket_grads)) != shapes or set(map(_dtype, bucket_grads)) != {bucket.dtype}:
                return False
            # get_device (-1 on the CPU) costs half of reading .device.
            if set(map(Tensor.get_device, bucket_grads)) != {bucket.params[0].get_device()}:
                return False
            if set(map(_layout, bucket_grads)) != {torch.strided}:
                return False
        for bucket, bucket_grads in zip(self.buckets, fresh):
            bucket.grads = bucket_grads
        return True


_shape, _dtype, _layout = (operator.attrgetter(name) for name in ("shape", "dtype", "layout"))


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
        fresh = plan is not None and plan.group is group and plan.key == self._key(group, hyper, grads, state)
        if fresh and plan.take_grads(grads):
            return plan.buckets
        # A new plan, or gradients unlike the validated ones: bucketing validates everything
        # again and raises naming what differs.
        buckets = build()
        shapes = [[p.shape for p in bucket.params] for bucket in buckets]
        self._plans[id(group)] = GroupPlan(group, self._key(group, hyper, grads, state), buckets, shapes)
        return buckets

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
