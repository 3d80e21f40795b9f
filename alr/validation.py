"""The one validation layer every backend goes through, before any kernel of a step runs.

A bucket is checked when its plan is built (:mod:`alr.plan`): every tensor of every
position (parameter, gradient, step counter, each state stream the declaration gives) for
shape, dtype, device and layout. Each step then checks the gradients, which are new tensors
every step. All of it runs for every param group before the first kernel of the step, so a
failure raises with nothing written anywhere, naming the parameter, the tensor and the
cause.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .algorithms import GroupHyper
from .bucket import Bucket

__all__ = ["check_bucket", "check_grads", "parameter_name", "has_internal_overlap"]


def parameter_name(group: dict[str, Any], group_index: int, position: int) -> str:
    """How an error names ``group["params"][position]``: its ``param_names`` entry when the
    optimizer was given named parameters, else its index."""
    if "param_names" in group:
        return f"parameter {group['param_names'][position]!r}"
    return f"params[{position}] of param group {group_index}"


def has_internal_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` share memory (an ``expand``ed tensor, say): an in-place
    update of it would race with itself."""
    extent = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride < extent:
            return True
        extent = stride * size
    return False


def check_grads(params: list[Tensor], grads: list[Tensor | None], names: list[str] | None = None) -> None:
    """Each gradient dense, with its parameter's shape, dtype and device.

    ``params[i].grad = x`` already checks these, but ``p.grad.data = x`` (and ``p.data = x``)
    bypass torch's setter.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is not None and (g.is_sparse or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device):
            name = names[i] if names is not None else f"params[{i}]"
            if g.is_sparse:
                raise RuntimeError(f"alr does not support sparse gradients, but {name} has one")
            _check_like(g, p, p.dtype, f"the gradient of {name}")


def check_bucket(bucket: Bucket, hyper: GroupHyper) -> None:
    """Every tensor of the bucket against its parameter and the algorithm's declaration.

    Raises:
        RuntimeError: naming the parameter, the tensor and the cause.
    """
    for i, (p, name) in enumerate(zip(bucket.params, bucket.names)):
        if has_internal_overlap(p):
            raise RuntimeError(f"alr: {name} has elements that share memory (an expanded tensor?); it cannot be updated in place")
        _check_like(bucket.grads[i], p, p.dtype, f"the gradient of {name}")
        step = bucket.steps[i]
        if not (isinstance(step, Tensor) and step.numel() == 1 and step.dtype == torch.float32 and step.device == p.device):
            raise RuntimeError(f"alr: state 'step' of {name} must be a one-element float32 tensor on {p.device}, got {_describe(step)}")
        for stream in hyper.streams(p.dtype):
            tensor = bucket.stream(stream.name)[i]
            what = f"state {stream.name!r} of {name}"
            if not stream.elementwise:
                _check_scalar(tensor, p, stream.dtype_for(p, hyper), what)
                continue
            _check_like(tensor, p, stream.dtype_for(p, hyper), what)
            if has_internal_overlap(tensor):
                raise RuntimeError(f"alr: {what} has elements that share memory; it cannot be updated in place")


def _check_like(t: Any, p: Tensor, dtype: torch.dtype, what: str) -> None:
    if not isinstance(t, Tensor):
        raise RuntimeError(f"alr: {what} must be a tensor, got {type(t).__name__}")
    if t.device != p.device:
        raise RuntimeError(f"alr: {what} is on {t.device}, but the parameter is on {p.device}")
    if t.dtype != dtype:
        raise RuntimeError(f"alr: {what} has dtype {t.dtype}, but {dtype} is expected (the parameter is {p.dtype})")
    if t.shape != p.shape:
        raise RuntimeError(f"alr: {what} has shape {list(t.shape)}, but the parameter has shape {list(p.shape)}")


def _check_scalar(t: Any, p: Tensor, dtype: torch.dtype, what: str) -> None:
    if not (isinstance(t, Tensor) and t.numel() == 1 and t.dtype == dtype and t.device == p.device):
        raise RuntimeError(f"alr: {what} must be a one-element {dtype} tensor on {p.device}, got {_describe(t)}")


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {list(t.shape)} on {t.device}"
    return type(t).__name__
