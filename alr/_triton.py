"""The ``triton`` backend: :mod:`alr.reference`'s three functions on the kernels of
``alr.kernels.step``, one launch per bucket (plus one to sum statistics per tensor).

Each function is a custom operator (``alr::triton_grad_stats``, ``alr::triton_hypergrad_stats``,
``alr::triton_update_``, registered with :func:`torch.library.custom_op` and given fake
implementations), so ``torch.compile`` traces a step as a few opaque calls per bucket
instead of tracing into Triton's launcher, and ``opcheck`` can test the schemas.

Host work per call: look up the device tables that describe the bucket (see
:func:`_device_table`), compute the per-tensor scalars with a few torch ops on the device,
launch. Nothing is read back to the host. Parameters on the CPU run through Triton's
interpreter when ``TRITON_INTERPRET=1`` is set: that is how the kernels are tested without
a GPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from .bucket import Bucket, GroupHyper, host_to_device, is_dense
from .reference import rounding_streams

__all__ = ["DTYPES", "grad_stats", "hypergrad_stats", "interpreted", "update"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Parameter dtypes the kernels take (the math runs in float32)."""

BLOCK = 1024
"""Elements per program: 4 KiB of fp32 per stream, enough to keep a block's loads in
flight, and small enough that a tensor of a few thousand elements still spreads over
several SMs. Not autotuned (see the kernels' module docstring)."""

SUM_ROWS = 128
"""Chunk rows that :func:`sum_chunks_kernel` adds per iteration."""

_TRITON_DTYPES: dict[torch.dtype, object] = {}


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _step_module():
    # Imported on first use: importing alr must not import Triton.
    from alr.kernels import step

    return step


def _triton_dtype(dtype: torch.dtype):
    if not _TRITON_DTYPES:
        import triton.language as tl

        _TRITON_DTYPES.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16})
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"alr's triton backend takes float32, bfloat16 or float16 parameters, not {dtype}")
    return _TRITON_DTYPES[dtype]


# --------------------------------------------------------------------------- tables

TABLE_CACHE_SIZE = 1024
"""Device tables kept (each a few bytes per tensor). Steady training reuses a handful per
bucket: the parameters' and states' pointers, and the gradients' (which the caching
allocator mostly hands back at the same addresses after ``zero_grad``)."""


@functools.lru_cache(maxsize=TABLE_CACHE_SIZE)
def _device_table(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor on ``device``, made once per distinct content (never
    synchronising, see :func:`host_to_device`).

    Keyed on the content itself: a pointer table is valid exactly when the pointers are
    the same, so a parameter whose storage was replaced (``p.data = ...``, ``to()``, a
    loaded state dict) gets a new table, and an address the allocator hands back gets the
    old, still correct, one.
    """
    return host_to_device(values, dtype, device)


@dataclass(frozen=True)
class Chunks:
    """How a bucket's tensors are cut into ``BLOCK``-element chunks (depends on sizes only)."""

    chunk_tensor: Tensor  # int32 [chunks]: the tensor of each chunk, tensor-major
    chunk_start: Tensor  # int64 [chunks]: its first element
    tensor_chunks: Tensor  # int32 [n + 1]: tensor t owns chunks [tensor_chunks[t], tensor_chunks[t + 1])
    numels: Tensor  # int64 [n]

    @property
    def count(self) -> int:
        return self.chunk_tensor.numel()


@functools.lru_cache(maxsize=TABLE_CACHE_SIZE)
def _chunks(numels: tuple[int, ...], device: torch.device) -> Chunks:
    chunk_tensor, chunk_start, tensor_chunks = [], [], [0]
    for index, numel in enumerate(numels):
        starts = range(0, numel, BLOCK)
        chunk_tensor += [index] * len(starts)
        chunk_start += starts
        tensor_chunks.append(len(chunk_tensor))
    return Chunks(
        _device_table(tuple(chunk_tensor), torch.int32, device),
        _device_table(tuple(chunk_start), torch.int64, device),
        _device_table(tuple(tensor_chunks), torch.int32, device),
        _device_table(numels, torch.int64, device),
    )


def _pointer_table(tensors: list[Tensor], device: torch.device) -> Tensor:
    return _device_table(tuple(t.data_ptr() for t in tensors), torch.int64, device)


# ------------------------------------------------------------------------- layouts


def _flat_layout(params: list[Tensor], others: list[list[Tensor]]) -> bool:
    """Whether every tensor can be processed as flat memory: each parameter dense, and its
    gradient and state with the same strides (the case after ``zeros_like``)."""
    for i, param in enumerate(params):
        if not is_dense(param) or any(other[i].stride() != param.stride() for other in others):
            return False
    return True


def _kernel_strides(param: Tensor) -> tuple[int, ...]:
    """The layout the kernels see a position in: the parameter's when it is dense, else
    row-major (so element offsets, the stochastic-rounding index, are the reference's)."""
    if is_dense(param):
        return param.stride()
    strides, step = [], 1
    for size in reversed(param.shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _staged(tensors: list[Tensor], strides: list[tuple[int, ...]], copies: list[tuple[Tensor, Tensor]] | None) -> list[Tensor]:
    """``tensors`` in the given layouts, copied where they differ; the (original, copy) pairs
    that must be written back after an update go into ``copies``. The rare path: strided
    or mismatched layouts."""
    out = []
    for t, stride in zip(tensors, strides):
        if t.stride() == stride:
            out.append(t)
            continue
        copy = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)
        if copies is not None:
            copies.append((t, copy))
        out.append(copy)
    return out


# ------------------------------------------------------------------------ scalars


def _adam_scalars(steps: list[Tensor], alphas: Tensor | None, opt: SimpleNamespace) -> Tensor:
    """float32 ``[n, 5]`` (``ADAM_SCALARS``), computed as :mod:`alr.reference` does."""
    before = torch.stack(steps).double()
    step = before + 1
    prev = before.clamp(min=1)
    if alphas is None:
        alphas = torch.zeros_like(step)
    decay = 1 - alphas * opt.weight_decay if opt.decoupled_weight_decay else torch.ones_like(step)
    columns = (
        decay,
        -alphas / (1 - opt.beta1**step),
        (1 - opt.beta2**step).sqrt(),
        1 - opt.beta1**prev,
        (1 - opt.beta2**prev).sqrt(),
    )
    return torch.stack(columns, dim=1).float()


def _sgd_scalars(steps: list[Tensor], alphas: Tensor | None, opt: SimpleNamespace) -> Tensor:
    """float32 ``[n, 2]`` (``SGD_SCALARS``), computed as :mod:`alr.reference` does."""
    first_step = torch.stack(steps) == 0
    neg_lr = -alphas if alphas is not None else torch.zeros(len(steps), dtype=torch.float64, device=first_step.device)
    damp = torch.where(first_step, 1.0, 1.0 - opt.dampening) if opt.dampening != 0 else torch.ones_like(neg_lr)
    return torch.stack([neg_lr.float(), damp.float()], dim=1)


# ------------------------------------------------------------------------- launches


def _dummy(device: torch.device) -> Tensor:
    return torch.zeros((), device=device)


def _sum_chunks(partials: Tensor, chunks: Chunks, n: int, width: int) -> Tensor:
    out = torch.empty(n, width, dtype=torch.float32, device=partials.device)
    if n > 0:
        _step_module().sum_chunks_kernel[(n,)](partials, chunks.tensor_chunks, out, WIDTH=width, ROWS=SUM_ROWS)
    return out


def _streams(lists: SimpleNamespace, opt: SimpleNamespace) -> list[list[Tensor]]:
    """The rows of the kernel's ``state_ptrs``: ``ADAM_STREAMS`` or ``SGD_STREAMS``."""
    if opt.algorithm == "adam":
        rows = [lists.params, lists.exp_avgs, lists.exp_avg_sqs] + ([lists.max_exp_avg_sqs] if opt.amsgrad else [])
    else:
        buffers = lists.momentum_buffers if opt.momentum != 0 else lists.params
        rows = [lists.params, buffers] + ([lists.prev_directions] if opt.needs_prev_direction else [])
    return rows + ([lists.master_params] if lists.master_params else [])


def _run_step(
    lists: SimpleNamespace,
    opt: SimpleNamespace,
    alphas: Tensor | None,
    grad_scale: Tensor | None,
    clip_coef: Tensor | None,
    skip: Tensor | None,
    write: bool,
    stats: bool,
) -> Tensor:
    """The Adam or SGD kernel over one bucket: update (``write``) and/or statistics.

    ``lists`` holds the bucket's tensor lists by the names of :meth:`Bucket.tensor_lists`,
    ``opt`` the keyword arguments of :meth:`GroupHyper.kernel_kwargs`. Returns the
    per-tensor statistics, float32 ``[n, 3]`` (``[0, 3]`` without ``stats``).
    """
    params, n = lists.params, len(lists.params)
    device = params[0].device
    streams = _streams(lists, opt)
    if not _flat_layout(params, [lists.grads, *streams[1:]]):
        copies: list[tuple[Tensor, Tensor]] = [] if write else None
        strides = [_kernel_strides(p) for p in params]
        staged = SimpleNamespace(**vars(lists))
        for name in _PER_ELEMENT_LISTS:
            staged_copies = copies if name in _MUTATED else None
            setattr(staged, name, _staged(getattr(lists, name), strides, staged_copies))
        result = _run_step(staged, opt, alphas, grad_scale, clip_coef, skip, write, stats)
        for original, copy in copies or ():
            original.copy_(copy)
        return result

    chunks = _chunks(tuple(p.numel() for p in params), device)
    partials = torch.empty(chunks.count if stats else 0, 3, dtype=torch.float32, device=device)
    if chunks.count > 0:
        dummy = _dummy(device)
        state = lists.exp_avgs or lists.momentum_buffers or lists.prev_directions or params
        stochastic = bool(lists.rounding_keys)
        common = dict(
            grad_scale=grad_scale if grad_scale is not None else dummy,
            clip_coef=clip_coef if clip_coef is not None else dummy,
            skip=skip if skip is not None else dummy,
            partials=partials,
            rounding_streams=rounding_streams(lists.rounding_keys, lists.steps) if stochastic else dummy,
            n_tensors=n,
            grad_sign=-1.0 if opt.maximize else 1.0,
            STORAGE=_triton_dtype(params[0].dtype),
            STATE=_triton_dtype(state[0].dtype),
            MASTER=bool(lists.master_params),
            MASTER_ROW=len(streams) - 1,
            STOCHASTIC=stochastic,
            HAS_SCALE=grad_scale is not None,
            HAS_CLIP=clip_coef is not None,
            HAS_SKIP=skip is not None,
            WRITE=write,
            STATS=stats,
            BLOCK=BLOCK,
        )
        tables = (
            _pointer_table([t for stream in streams for t in stream], device),
            _pointer_table(lists.grads, device),
            chunks.chunk_tensor,
            chunks.chunk_start,
            chunks.numels,
        )
        kernels = _step_module()
        if opt.algorithm == "adam":
            kernels.adam_kernel[(chunks.count,)](
                *tables,
                _adam_scalars(lists.steps, alphas, opt),
                lerp_weight=1 - opt.beta1,
                beta2=opt.beta2,
                one_minus_beta2=1 - opt.beta2,
                eps=opt.eps,
                weight_decay=opt.weight_decay,
                COUPLED_DECAY=opt.weight_decay != 0 and not opt.decoupled_weight_decay,
                AMSGRAD=opt.amsgrad,
                **common,
            )
        else:
            kernels.sgd_kernel[(chunks.count,)](
                *tables,
                _sgd_scalars(lists.steps, alphas, opt),
                momentum=opt.momentum,
                weight_decay=opt.weight_decay,
                COUPLED_DECAY=opt.weight_decay != 0,
                MOMENTUM=opt.momentum != 0,
                NESTEROV=opt.nesterov,
                STORE_PREV=opt.needs_prev_direction,
                **common,
            )
    if write:
        torch._foreach_add_(lists.steps, 1.0 if skip is None else (~skip).float())
    return _sum_chunks(partials, chunks, n, 3) if stats else partials


# ---------------------------------------------------------------------------- ops

_TENSOR_LISTS = ("params", "grads", "steps", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "momentum_buffers",
                 "prev_directions", "master_params", "rounding_keys")  # fmt: skip
_MUTATED = tuple(name for name in _TENSOR_LISTS if name not in ("grads", "rounding_keys"))
_PER_ELEMENT_LISTS = tuple(name for name in _TENSOR_LISTS if name not in ("steps", "rounding_keys"))
"""The lists of tensors shaped like their parameters (the others hold 0-d tensors)."""


@torch.library.custom_op("alr::triton_grad_stats", mutates_args=())
def _grad_stats_op(grads: list[Tensor], grad_scale: Tensor | None) -> Tensor:
    """float32 ``[n, 2]``: per gradient, ``Σ (g/S)²`` and whether any element is inf/nan."""
    if not grads:
        return torch.empty(0, 2)
    device = grads[0].device
    grads = [g if is_dense(g) else g.contiguous() for g in grads]
    chunks = _chunks(tuple(g.numel() for g in grads), device)
    partials = torch.empty(chunks.count, 2, dtype=torch.float32, device=device)
    if chunks.count > 0:
        _step_module().grad_stats_kernel[(chunks.count,)](
            _pointer_table(grads, device),
            chunks.chunk_tensor,
            chunks.chunk_start,
            chunks.numels,
            grad_scale if grad_scale is not None else _dummy(device),
            partials,
            STORAGE=_triton_dtype(grads[0].dtype),
            HAS_SCALE=grad_scale is not None,
            BLOCK=BLOCK,
        )
    stats = _sum_chunks(partials, chunks, len(grads), 2)
    stats[:, 1] = (stats[:, 1] > 0).float()
    return stats


@torch.library.custom_op("alr::triton_hypergrad_stats", mutates_args=())
def _hypergrad_stats_op(
    params: list[Tensor], grads: list[Tensor], steps: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], momentum_buffers: list[Tensor],
    prev_directions: list[Tensor], master_params: list[Tensor], rounding_keys: list[Tensor],
    grad_scale: Tensor | None, clip_coef: Tensor | None,
    algorithm: str, beta1: float, beta2: float, eps: float, weight_decay: float,
    decoupled_weight_decay: bool, amsgrad: bool, maximize: bool, momentum: float,
    dampening: float, nesterov: bool, needs_prev_direction: bool,
) -> Tensor:  # fmt: skip
    """float32 ``[n, 3]``: per tensor ``g·d_prev``, ``g·g``, ``d_prev·d_prev``; writes nothing."""
    lists, opt = _split(locals())
    return _run_step(lists, opt, None, grad_scale, clip_coef, None, write=False, stats=True)


@torch.library.custom_op("alr::triton_update_", mutates_args=_MUTATED)
def _update_op(
    params: list[Tensor], grads: list[Tensor], steps: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], momentum_buffers: list[Tensor],
    prev_directions: list[Tensor], master_params: list[Tensor], rounding_keys: list[Tensor],
    alphas: Tensor, grad_scale: Tensor | None,
    clip_coef: Tensor | None, skip: Tensor | None, collect_stats: bool, algorithm: str,
    beta1: float, beta2: float, eps: float, weight_decay: float, decoupled_weight_decay: bool,
    amsgrad: bool, maximize: bool, momentum: float, dampening: float, nesterov: bool,
    needs_prev_direction: bool,
) -> Tensor:  # fmt: skip
    """Update in place; float32 ``[n, 3]`` statistics with ``collect_stats``, else ``[0, 3]``."""
    lists, opt = _split(locals())
    return _run_step(lists, opt, alphas, grad_scale, clip_coef, skip, write=True, stats=collect_stats)


def _split(arguments: dict) -> tuple[SimpleNamespace, SimpleNamespace]:
    """An op's arguments as (tensor lists, kernel options)."""
    lists = SimpleNamespace(**{name: arguments[name] for name in _TENSOR_LISTS})
    opt = SimpleNamespace(**{name: arguments[name] for name in _OPTION_NAMES})
    return lists, opt


_OPTION_NAMES = ("algorithm", "beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad",
                 "maximize", "momentum", "dampening", "nesterov", "needs_prev_direction")  # fmt: skip


def _stats_like(tensors: list[Tensor], rows: int, width: int) -> Tensor:
    device = tensors[0].device if tensors else None
    return torch.empty(rows, width, dtype=torch.float32, device=device)


@_grad_stats_op.register_fake
def _(grads, grad_scale):
    return _stats_like(grads, len(grads), 2)


@_hypergrad_stats_op.register_fake
def _(params, *args, **kwargs):
    return _stats_like(params, len(params), 3)


@_update_op.register_fake
def _(params, grads, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, momentum_buffers, prev_directions,
      master_params, rounding_keys, alphas, grad_scale, clip_coef, skip, collect_stats, *options):  # fmt: skip
    return _stats_like(params, len(params) if collect_stats else 0, 3)


# ------------------------------------------------------------------ backend interface


def grad_stats(bucket: Bucket, grad_scale: Tensor | None) -> Tensor:
    """See :func:`alr.reference.grad_stats`."""
    return _grad_stats_op(bucket.grads, grad_scale)


def hypergrad_stats(
    bucket: Bucket, hyper: GroupHyper, grad_scale: Tensor | None, clip_coef: Tensor | None
) -> Tensor:
    """See :func:`alr.reference.hypergrad_stats`."""
    return _hypergrad_stats_op(*_op_lists(bucket), grad_scale, clip_coef, **hyper.kernel_kwargs())


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
    stats = _update_op(*_op_lists(bucket), alphas, grad_scale, clip_coef, skip, collect_stats, **hyper.kernel_kwargs())
    return stats if collect_stats else None


def _op_lists(bucket: Bucket) -> tuple[list[Tensor], ...]:
    """The tensor lists in the order of this module's ops (``_TENSOR_LISTS``)."""
    return (*bucket.tensor_lists(), bucket.rounding_keys)
