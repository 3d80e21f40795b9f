"""The ``cpu`` and ``cuda`` backends: :mod:`alr.reference`'s three functions on the compiled
``alr`` ops.

Each function hands a whole bucket to one op call, defined in ``csrc/registration.cpp`` and
typed per algorithm like ATen's ``_fused_adam_``: ``torch.ops.alr.grad_stats``, and
``<algorithm>_hypergrad_stats`` / ``<algorithm>_update_`` whose arguments follow the
algorithm's declaration (:func:`alr.op_args.op_schema`). The dispatcher runs the kernel of
the bucket's device. The CPU kernel (``csrc/cpu/ops.cpp``, in ``alr._C``) reads the
per-tensor scalars on its host side and runs every tensor's elements across torch's
intra-op threads. The CUDA kernel (``csrc/cuda/ops.cpp``, in ``alr._C_cuda``) reads nothing
on the host: its kernels take the step counters, learning rates, GradScaler scale, clip
coefficient and skip flag by device pointer. The Python side does no per-tensor work: the
bucket's lists are passed as they are.

Fake (meta) implementations are registered here (:mod:`alr.op_args`), so the ops trace under
``torch.compile`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension
from .algorithms import ALGORITHMS, GroupHyper
from .bucket import Bucket
from .op_args import grad_stats_fake, hypergrad_stats_fake, op_lists, update_fake

__all__ = ["grad_stats", "hypergrad_stats", "update", "ops_available", "OPS"]

OPS = ("grad_stats", *(f"{name}_{op}" for name in ALGORITHMS for op in ("hypergrad_stats", "update_")))
"""The ops every native extension registers for its dispatch key."""


def ops_available(dispatch_key: str = "CPU") -> bool:
    """Whether the extension of ``dispatch_key`` (``alr._C`` for "CPU", ``alr._C_cuda``, which
    loads ``alr._C`` first, for "CUDA") loaded and registered every op for that key."""
    load = _extension.load_cuda_extension if dispatch_key == "CUDA" else _extension.load_cpu_extension
    if load() is None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"alr::{op}", dispatch_key) for op in OPS)


def grad_stats(bucket: Bucket, grad_scale: Tensor | None) -> Tensor:
    """See :func:`alr.reference.grad_stats`."""
    return torch.ops.alr.grad_stats.default(bucket.grads, grad_scale)


def hypergrad_stats(
    bucket: Bucket, hyper: GroupHyper, grad_scale: Tensor | None, clip_coef: Tensor | None
) -> Tensor:
    """See :func:`alr.reference.hypergrad_stats`."""
    algorithm = hyper.declaration
    op = _op(f"{algorithm.name}_hypergrad_stats")
    return op(*op_lists(bucket, algorithm, update=False), grad_scale, clip_coef, **algorithm.kernel_arguments(hyper))


def update(
    bucket: Bucket,
    hyper: GroupHyper,
    alphas: Tensor,
    grad_scale: Tensor | None,
    clip_coef: Tensor | None,
    skip: Tensor | None,
    collect_stats: bool,
) -> Tensor | None:
    """See :func:`alr.reference.update`."""
    algorithm = hyper.declaration
    op = _op(f"{algorithm.name}_update_")
    lists = op_lists(bucket, algorithm, update=True)
    options = algorithm.kernel_arguments(hyper)
    stats = op(*lists, alphas, grad_scale, clip_coef, skip, collect_stats=collect_stats, **options)
    return stats if collect_stats else None


def _op(name: str):
    return getattr(torch.ops.alr, name).default


def _register_fakes() -> None:
    """Shape-only implementations for FakeTensor / meta tracing (alr.op_args)."""
    torch.library.register_fake("alr::grad_stats")(grad_stats_fake)
    for name in ALGORITHMS:
        torch.library.register_fake(f"alr::{name}_hypergrad_stats")(hypergrad_stats_fake)
        torch.library.register_fake(f"alr::{name}_update_")(update_fake)


if _extension.load_cpu_extension() is not None and hasattr(torch.ops.alr, "adam_update_"):
    _register_fakes()
