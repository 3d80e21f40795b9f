"""Functional form of one ALR step: statistics, learning-rate adaptation, update, dispatch.

:class:`alr.ALROptimizer` gathers its parameters into :class:`GroupWork` records and calls
:func:`alr_step`. This module groups nothing itself (the optimizer builds one
:class:`~alr.bucket.Bucket` per (device, dtype) of each group), resolves one backend per
bucket through :mod:`alr.backends`, and combines the per-tensor statistics the backends
return into the device-resident scalars: the clip coefficient, the skip flag and κ. The
math of that combination is :mod:`alr.reference`'s, whatever the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import backends, reference
from .bucket import Bucket, GroupHyper
from .distributed import StatsReduction

__all__ = ["GroupWork", "alr_step"]


@dataclass
class GroupWork:
    """One param group's share of a step.

    Attributes:
        hyper: the group's hyper-parameters.
        buckets: its parameters with gradients, one bucket per (device, dtype).
        kappa: float32 multiplier κ, shape ``[]`` (group scope) or ``[len(group params)]``
            (tensor scope, indexed by ``Bucket.positions``); updated in place.
        grad_sq_avg: float32 running mean of ``‖g‖²`` per scope (the ``mult`` rule's
            normaliser), the shape of ``kappa``; updated in place.
        backend: the requested backend name (``"auto"`` or a name of ``alr.backends``).
    """

    hyper: GroupHyper
    buckets: list[Bucket]
    kappa: Tensor
    grad_sq_avg: Tensor
    backend: str


def alr_step(
    groups: list[GroupWork],
    *,
    grad_norm: Tensor,
    skipped_steps: Tensor,
    max_grad_norm: float | None,
    skip_nonfinite: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    reduction: StatsReduction | None = None,
) -> None:
    """Run one optimizer step over ``groups`` without synchronising with the host.

    Under a ``reduction`` every rank must pass the same groups, in the same order, whether
    or not it holds gradients in them (a group without buckets adds zeros to the sums):
    the packed collectives then have the same layout on every rank.

    Args:
        grad_norm: 0-d float32; receives the global norm of the unscaled gradients when the
            statistics pre-pass runs (``max_grad_norm`` set or ``skip_nonfinite``).
        skipped_steps: 0-d int64 counter, incremented in place when the step is skipped.
        max_grad_norm: clip the global gradient norm to this value, or None.
        skip_nonfinite: skip the whole step when any gradient element is inf or nan.
        grad_scale, found_inf: handed over by :class:`torch.amp.GradScaler`.
        reduction: how partial statistics become global when the elements are spread over
            ranks (see :mod:`alr.distributed`); None on one process.
    """
    impls = {id(b): backends.resolve(g.backend, b.device, b.dtype) for g in groups for b in g.buckets}
    stats_device = grad_norm.device
    clip_coef, skip = None, None
    if max_grad_norm is not None or skip_nonfinite:
        per_tensor = torch.cat(
            [
                impls[id(b)].grad_stats(b, _on(grad_scale, b.device)).to(stats_device)
                for g in groups
                for b in g.buckets
            ]
            or [torch.zeros(0, 2, device=stats_device)]  # a rank without gradients (see below)
        )
        totals = torch.stack([per_tensor[:, 0].sum(), per_tensor[:, 1].sum()])  # Σ g², tensors with inf/nan
        if reduction is not None:
            reduction.sum_([totals])
        # float64 when any gradient is (reference.grad_stats_dtype), else float32.
        norm = totals[0].sqrt()
        grad_norm.copy_(norm)
        if max_grad_norm is not None:
            clip_coef = reference.clip_coefficient(norm, max_grad_norm)
        if skip_nonfinite:
            skip = totals[1] > 0
    if found_inf is not None:
        found = found_inf.to(stats_device) > 0
        skip = found if skip is None else skip | found
    if skip is not None:
        skipped_steps.add_(skip.to(skipped_steps.dtype))

    scale = {id(b): _on(grad_scale, b.device) for g in groups for b in g.buckets}
    clip = {id(b): _on(clip_coef, b.device) for g in groups for b in g.buckets}
    exact = [g for g in groups if g.hyper.adapts and g.hyper.hypergrad_exact]
    if exact:
        stats = [
            [impls[id(b)].hypergrad_stats(b, g.hyper, scale[id(b)], clip[id(b)]) for b in g.buckets] for g in exact
        ]
        _adapt_all(exact, stats, skip, reduction)
    collected, collected_stats = [], []
    for group in groups:
        collect = group.hyper.adapts and not group.hyper.hypergrad_exact
        stats = [
            impls[id(b)].update(
                b, group.hyper, _alphas(group, b), scale[id(b)], clip[id(b)], _on(skip, b.device), collect
            )
            for b in group.buckets
        ]
        if collect:
            collected.append(group)
            collected_stats.append(stats)
    _adapt_all(collected, collected_stats, skip, reduction)


def _alphas(group: GroupWork, bucket: Bucket) -> Tensor:
    """Effective learning rates ``κ·lr`` of the bucket's tensors, float64 ``[len(bucket)]``."""
    kappa = group.kappa
    if kappa.dim() == 0:
        kappa = kappa.expand(len(bucket))
    else:
        kappa = kappa[bucket.position_index().to(kappa.device)]
    lr = group.hyper.lr
    if isinstance(lr, Tensor):
        lr = lr.to(device=bucket.device, dtype=torch.float64).reshape(())
    return kappa.to(bucket.device).double() * lr


def _adapt_all(
    groups: list[GroupWork], stats: list[list[Tensor]], skip: Tensor | None, reduction: StatsReduction | None
) -> None:
    """Sum each group's per-tensor hypergradient statistics over its scopes, make them
    global (one collective for all groups), and update κ and ``a``. In tensor scope a tensor
    that no rank stepped (no gradient) keeps its κ and ``a``."""
    scoped = [_scoped(group, s) for group, s in zip(groups, stats)]
    if reduction is not None:
        reduction.sum_([s for group, s in zip(groups, scoped) if reduction.per_tensor or group.kappa.dim() == 0])
    for group, s in zip(groups, scoped):
        kappa = group.kappa
        new_kappa, new_avg = reference.adapt_kappa(
            kappa, group.grad_sq_avg, s[..., :3], group.hyper.lr, group.hyper, _on(skip, kappa.device)
        )
        if kappa.dim() > 0:
            stepped = s[:, 3] > 0
            new_kappa, new_avg = torch.where(stepped, new_kappa, kappa), torch.where(stepped, new_avg, group.grad_sq_avg)
        kappa.copy_(new_kappa)
        group.grad_sq_avg.copy_(new_avg)


def _scoped(group: GroupWork, stats: list[Tensor]) -> Tensor:
    """float32 ``[3]`` (group scope) or ``[len(group params), 4]`` (tensor scope: the three
    statistics and a count of the ranks that stepped the tensor, 0 for a tensor without a
    gradient; summed with the statistics by a distributed reduction)."""
    kappa = group.kappa
    if kappa.dim() == 0:
        return torch.cat([s.to(kappa.device) for s in stats] or [torch.zeros(0, 3, device=kappa.device)]).sum(0)
    scoped = torch.zeros(kappa.numel(), 4, dtype=kappa.dtype, device=kappa.device)
    for bucket, s in zip(group.buckets, stats):
        s = torch.nn.functional.pad(s.to(kappa.device), (0, 1), value=1.0)
        scoped.index_copy_(0, bucket.position_index().to(kappa.device), s)
    return scoped


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)
