"""The plan cache: each param group's bucketing, built once and reused while it holds.

Bucketing touches every parameter's state in Python (creating what is missing, about 3 µs
per parameter) and validates every tensor, so it is redone only when what it was built
from changes. Per step only the gradients are collected and checked.

**Invalidation rule.** A group's plan is rebuilt at the next step when any of these differs
from when it was built:

* the param-group dict itself (a group replaced in ``param_groups``), or its ``params``
  list: its length or any entry (a parameter replaced or added by hand);
* which of the group's parameters have a gradient;
* the options that decide which state tensors exist (:attr:`GroupHyper.state_layout`) and
  the group's ``backend``;
* the optimizer's state: the ``state`` mapping object, its number of entries, or its
  version, which :meth:`PlanCache.invalidate` advances (``load_state_dict`` calls it); and
  for each stepped parameter its state dict (``opt.state[p] = {}``) and every tensor in it
  (``opt.state[p]["exp_avg"] = t``), by identity, and those tensors' shapes and dtypes
  (``t.data = ...``).

Each step also checks that the parameters and gradients have the shapes, dtype, device and
(dense) layout the plan was validated with; when they do not (a parameter resized or cast
through ``p.data``, a gradient replaced through ``p.grad.data``), the plan is rebuilt, which
validates every tensor again and raises naming what differs. In-place changes to a tensor's
values (``copy_``) need nothing: the plan holds the tensors themselves.

The identity checks are C-level maps over the tensors, about 1 µs per tensor per step
altogether (``bench``: see the README's "Reliability").
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


_shape, _dtype, _layout = (operator.attrgetter(name) for name in ("shape", "dtype", "layout"))


@dataclass
class PlanSources:
    """What one bucket was built from, by identity: the group's parameters at its positions,
    their state dicts and, per state key (``step`` and each stream), the dicts' values, with
    the shapes and dtypes those were validated with (a tensor's ``.data`` can be swapped)."""

    params: list[Tensor]
    entries: list[dict[str, Any]]
    values: dict[str, list[Any]]
    kinds: dict[str, tuple[list[torch.Size], set[torch.dtype]]]

    def hold(self, state: dict[Tensor, dict[str, Any]]) -> bool:
        """Whether ``state`` still holds these dicts and values (the same objects, of the
        same shapes and dtypes)."""
        entries = list(map(state.get, self.params))
        if any(map(operator.is_not, entries, self.entries)):
            return False
        for key, values in self.values.items():
            try:
                if any(map(operator.is_not, map(operator.itemgetter(key), entries), values)):
                    return False
            except KeyError:
                return False
            if (list(map(_shape, values)), set(map(_dtype, values))) != self.kinds[key]:
                return False
        return True


@dataclass
class GroupPlan:
    """A param group's buckets, valid while ``key`` (see :meth:`PlanCache.buckets`) and the
    sources hold and each step's parameters and gradients have the shapes (``shapes``, per
    bucket), dtype, device and layout the buckets were validated with."""

    group: dict[str, Any]
    key: tuple
    params: list[Tensor]
    buckets: list[Bucket]
    sources: list[PlanSources]
    shapes: list[list[torch.Size]]
    kinds: list[tuple[torch.dtype, int]]
    """Per bucket, the dtype and ``get_device()`` its tensors were validated with."""

    def holds(self, group: dict[str, Any], state: dict[Tensor, dict[str, Any]]) -> bool:
        """Whether the group's parameter list and the state are those the plan was built from."""
        params = group["params"]
        if len(params) != len(self.params) or any(map(operator.is_not, params, self.params)):
            return False
        return all(sources.hold(state) for sources in self.sources)

    def take_grads(self, grads: list[Tensor | None]) -> bool:
        """Give every bucket this step's gradients, if they and the parameters are as
        validated (C-level maps per bucket: ~0.3 µs per tensor, against ~0.6 µs for checking
        each tensor in a Python loop); False, assigning nothing, if any is not."""
        fresh = [[grads[i] for i in bucket.positions] for bucket in self.buckets]
        for bucket, shapes, (dtype, device), bucket_grads in zip(self.buckets, self.shapes, self.kinds, fresh):
            for tensors in (bucket.params, bucket_grads):
                if list(map(_shape, tensors)) != shapes or set(map(_dtype, tensors)) != {dtype}:
                    return False
                # get_device (-1 on the CPU) costs half of reading .device.
                if set(map(Tensor.get_device, tensors)) != {device}:
                    return False
            if set(map(_layout, bucket_grads)) != {torch.strided}:
                return False
        for bucket, bucket_grads in zip(self.buckets, fresh):
            bucket.grads = bucket_grads
        return True


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
        fresh = (
            plan is not None
            and plan.group is group
            and plan.key == self._key(group, hyper, grads, state)
            and plan.holds(group, state)
        )
        if fresh and plan.take_grads(grads):
            return plan.buckets
        # A new plan, or tensors unlike the validated ones: bucketing validates everything
        # again and raises naming what differs.
        buckets = build()
        shapes = [[p.shape for p in bucket.params] for bucket in buckets]
        params = list(group["params"])
        sources = [_sources(bucket, params, state) for bucket in buckets]
        kinds = [(bucket.dtype, bucket.params[0].get_device()) for bucket in buckets]
        key = self._key(group, hyper, grads, state)
        self._plans[id(group)] = GroupPlan(group, key, params, buckets, sources, shapes, kinds)
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


def _sources(bucket: Bucket, params: list[Tensor], state: dict[Tensor, dict[str, Any]]) -> PlanSources:
    origins = [params[i] for i in bucket.positions]
    entries = [state[p] for p in origins]
    values = {key: [entry[key] for entry in entries] for key in ("step", *bucket.state)}
    kinds = {key: (list(map(_shape, v)), set(map(_dtype, v))) for key, v in values.items()}
    return PlanSources(origins, entries, values, kinds)


def bucket_group(
    group: dict[str, Any],
    group_index: int,
    hyper: GroupHyper,
    state: dict[Tensor, dict[str, Any]],
    rounding_key: Callable[[int], int],
    started: list[Tensor] | None = None,
) -> list[Bucket]:
    """Lazily initialise the state of the group's parameters that have gradients, bucket
    them by (device, dtype) and validate every bucket.

    Args:
        state: the optimizer's ``state`` (a defaultdict of per-parameter dicts).
        rounding_key: the stochastic-rounding key of the parameter at a position.
        started: receives the parameters whose state this call starts (so that a step that
            fails validation can remove it again).
    """
    buckets: dict[tuple[torch.device, torch.dtype], Bucket] = {}
    params = group["params"]
    names = [parameter_name(group, group_index, i) for i in range(len(params))]
    check_grads(params, [p.grad for p in params], names)
    for position, p in enumerate(params):
        if p.grad is None:
            continue
        if group["backend"] != "auto":
            try:
                backends.check_device(group["backend"], p.device, p.dtype)
            except ValueError as error:
                raise ValueError(f"alr: {names[position]}: {error}") from None
        if started is not None and "step" not in state.get(p, {}):
            started.append(p)
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
