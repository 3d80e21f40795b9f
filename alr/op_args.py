"""How a bucket becomes the arguments of the kernel ops, native and Triton alike.

The step ops are typed per algorithm (``alr::adam_update_``, ``alr::sgd_hypergrad_stats``,
``alr::triton_adam_update_``, ...), and their arguments follow the algorithm's declaration
(:mod:`alr.algorithms`): the lists ``params, grads, steps``, then the algorithm's streams in
declaration order, the master copies and, for an update, the rounding keys
(:func:`op_streams`); a bucket passes an empty list for each stream its options do not
keep. Then the per-tensor values, the device scalars and, as keywords, the declared
hyper-parameters (``float[] hyper``) and flags. :func:`op_schema` writes the schema;
``csrc/registration.cpp`` defines the native ops with the same strings (tested). This
module also holds the one shape function (fake implementation) of each kind of op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .algorithms import GRAD_STATS, HYPERGRAD_STATS, MASTER_PARAM, ROUNDING_KEY, Algorithm
from .bucket import Bucket

__all__ = [
    "grad_stats_fake",
    "hypergrad_stats_fake",
    "mutated_lists",
    "op_lists",
    "op_schema",
    "op_streams",
    "update_fake",
]


def op_streams(algorithm: Algorithm, update: bool) -> tuple[str, ...]:
    """The state lists of ``algorithm``'s ops after ``params, grads, steps``: its streams in
    declaration order, the master copies, and for an update the rounding keys."""
    return (*(s.name for s in algorithm.streams), MASTER_PARAM, *((ROUNDING_KEY,) if update else ()))


def op_lists(bucket: Bucket, algorithm: Algorithm, update: bool) -> tuple[list[Tensor], ...]:
    """A bucket's tensor lists for ``algorithm``'s update or statistics op."""
    return (bucket.params, bucket.grads, bucket.steps, *(bucket.stream(name) for name in op_streams(algorithm, update)))


def mutated_lists(algorithm: Algorithm) -> tuple[str, ...]:
    """The lists an update of ``algorithm`` writes."""
    return ("params", "steps", *(s.name for s in algorithm.streams), MASTER_PARAM)


def op_schema(algorithm: Algorithm, update: bool, per_tensor: str | None) -> str:
    """The schema of ``algorithm``'s update (mutating) or statistics op, from its declaration.

    ``per_tensor`` names the tensor argument that carries the per-tensor values after the
    lists: ``"alphas"`` (float64 ``[n]`` effective learning rates: the native ops compute
    the declared scalars themselves), ``"scalars"`` (the declared scalars, float32 ``[n, k]``:
    the Triton ops), or None (none: the native statistics op).
    """
    names = ("params", "grads", "steps", *op_streams(algorithm, update))
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    mutated = mutated_lists(algorithm) if update else ()
    lists = [f"Tensor({next(letters)}!)[] {n}" if n in mutated else f"Tensor[] {n}" for n in names]
    tensors = [*lists, *([f"Tensor {per_tensor}"] if per_tensor else []), "Tensor? grad_scale", "Tensor? clip_coef"]
    tensors += ["Tensor? skip"] if update else []
    options = ["float[] hyper", *(f"bool {flag}" for flag in algorithm.kernel_flags)]
    options += ["bool collect_stats"] if update else []
    return f"({', '.join(tensors)}, *, {', '.join(options)}) -> Tensor"


def _stats_like(tensors: list[Tensor], rows: int, width: int) -> Tensor:
    device = tensors[0].device if len(tensors) else None
    return torch.empty(rows, width, dtype=torch.float32, device=device)


def grad_stats_fake(grads: list[Tensor], *args) -> Tensor:
    """``[len(grads), len(GRAD_STATS)]``, float64 for float64 gradients, else float32."""
    out = _stats_like(grads, len(grads), len(GRAD_STATS))
    return out.double() if len(grads) and grads[0].dtype == torch.float64 else out


def hypergrad_stats_fake(params: list[Tensor], *args, **kwargs) -> Tensor:
    """float32 ``[len(params), len(HYPERGRAD_STATS)]``."""
    return _stats_like(params, len(params), len(HYPERGRAD_STATS))


def update_fake(params: list[Tensor], *args, collect_stats: bool, **kwargs) -> Tensor:
    """The statistics of ``hypergrad_stats_fake`` with ``collect_stats``, else ``[0, 3]``."""
    return _stats_like(params, len(params) if collect_stats else 0, len(HYPERGRAD_STATS))
