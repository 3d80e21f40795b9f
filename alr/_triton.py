"""The ``triton`` backend: :mod:`alr.reference`'s three functions on the kernels of
``alr.kernels.step``, one launch per bucket (plus one to sum statistics per tensor).

Each function is a custom operator registered with :func:`torch.library.custom_op` and
given a fake implementation: ``alr::triton_grad_stats``, and per algorithm of
:mod:`alr.algorithms` a statistics and an update op (``alr::triton_adam_hypergrad_stats``,
``alr::triton_adam_update_``, ...) whose schemas are generated from the algorithm's
declaration (:func:`alr.op_args.op_schema`). So ``torch.compile`` traces a step as a few
opaque calls per bucket instead of tracing into Triton's launcher, and ``opcheck`` can test
the schemas.

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

import torch
from torch import Tensor

from .algorithms import ALGORITHMS, MASTER_PARAM, PREV_DIRECTION, ROUNDING_KEY, Algorithm, GroupHyper
from .bucket import Bucket, host_to_device, is_dense
from .op_args import grad_stats_fake, hypergrad_stats_fake, mutated_lists, op_lists, op_schema, op_streams, update_fake
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


# ------------------------------------------------------------------------- launches


def _dummy(device: torch.device) -> Tensor:
    return torch.zeros((), device=device)


def _sum_chunks(partials: Tensor, chunks: Chunks, n: int, width: int) -> Tensor:
    out = torch.empty(n, width, dtype=torch.float32, device=partials.device)
    if n > 0:
        _step_module().sum_chunks_kernel[(n,)](partials, chunks.tensor_chunks, out, WIDTH=width, ROWS=SUM_ROWS)
    return out


def _rows(lists: dict[str, list[Tensor]], algorithm: Algorithm) -> list[list[Tensor]]:
    """The rows of the kernel's ``state_ptrs`` (``ADAM_STREAMS`` / ``SGD_STREAMS``): the
    parameters, each of the algorithm's streams in declaration order (the parameters'
    pointers stand in for a stream the options do not keep: the kernel never reads it), the
    master copies when kept (row ``MASTER_ROW`` = 1 + the number of streams)."""
    params = lists["params"]
    rows = [params, *(lists[s.name] or params for s in algorithm.streams)]
    return rows + ([lists[MASTER_PARAM]] if lists[MASTER_PARAM] else [])


def _adam_launch(lists: dict[str, list[Tensor]], options: dict) -> tuple[object, dict]:
    beta1, beta2, eps, weight_decay = options["hyper"]
    return _step_module().adam_kernel, dict(
        lerp_weight=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        eps=eps,
        weight_decay=weight_decay,
        COUPLED_DECAY=weight_decay != 0 and not options["decoupled_weight_decay"],
        AMSGRAD=bool(lists["max_exp_avg_sq"]),
    )


def _sgd_launch(lists: dict[str, list[Tensor]], options: dict) -> tuple[object, dict]:
    momentum, _, weight_decay = options["hyper"]  # dampening is in the per-tensor scalars
    return _step_module().sgd_kernel, dict(
        momentum=momentum,
        weight_decay=weight_decay,
        COUPLED_DECAY=weight_decay != 0,
        MOMENTUM=bool(lists["momentum_buffer"]),
        NESTEROV=options["nesterov"],
        STORE_PREV=bool(lists[PREV_DIRECTION]),
    )


_LAUNCHES = {"adam": _adam_launch, "sgd": _sgd_launch}
"""Each algorithm's kernel and its own arguments, from its op's lists and options (the
keyword arguments of :meth:`Algorithm.kernel_arguments`)."""


def _run_step(
    lists: dict[str, list[Tensor]],
    algorithm: Algorithm,
    options: dict,
    scalars: Tensor,
    grad_scale: Tensor | None,
    clip_coef: Tensor | None,
    skip: Tensor | None,
    write: bool,
    stats: bool,
) -> Tensor:
    """An algorithm's kernel over one bucket: update (``write``) and/or statistics.

    ``lists`` holds the bucket's tensor lists by the names of the op's schema
    (:func:`alr.op_args.op_schema`), ``options`` its keyword arguments, ``scalars`` the
    declaration's per-tensor scalars (float32 ``[n, k]``). Returns the per-tensor
    statistics, float32 ``[n, 3]`` (``[0, 3]`` without ``stats``).
    """
    params, n = lists["params"], len(lists["params"])
    device = params[0].device
    rows = _rows(lists, algorithm)
    if not _flat_layout(params, [lists["grads"], *rows[1:]]):
        return _run_staged(lists, algorithm, options, scalars, grad_scale, clip_coef, skip, write=write, stats=stats)

    chunks = _chunks(tuple(p.numel() for p in params), device)
    partials = torch.empty(chunks.count if stats else 0, 3, dtype=torch.float32, device=device)
    if chunks.count > 0:
        dummy = _dummy(device)
        keys = lists.get(ROUNDING_KEY, [])
        state = next((lists[s.name] for s in algorithm.streams if lists[s.name]), params)
        kernel, specific = _LAUNCHES[algorithm.name](lists, options)
        kernel[(chunks.count,)](
            _pointer_table([t for row in rows for t in row], device),
            _pointer_table(lists["grads"], device),
            chunks.chunk_tensor,
            chunks.chunk_start,
            chunks.numels,
            scalars,
            grad_scale=grad_scale if grad_scale is not None else dummy,
            clip_coef=clip_coef if clip_coef is not None else dummy,
            skip=skip if skip is not None else dummy,
            partials=partials,
            rounding_streams=rounding_streams(keys, lists["steps"]) if keys else dummy,
            n_tensors=n,
            grad_sign=-1.0 if options["maximize"] else 1.0,
            STORAGE=_triton_dtype(params[0].dtype),
            STATE=_triton_dtype(state[0].dtype),
            MASTER=bool(lists[MASTER_PARAM]),
            MASTER_ROW=1 + len(algorithm.streams),
            STOCHASTIC=bool(keys),
            HAS_SCALE=grad_scale is not None,
            HAS_CLIP=clip_coef is not None,
            HAS_SKIP=skip is not None,
            WRITE=write,
            STATS=stats,
            BLOCK=BLOCK,
            **specific,
        )
    if write:
        torch._foreach_add_(lists["steps"], 1.0 if skip is None else (~skip).float())
    return _sum_chunks(partials, chunks, n, 3) if stats else partials


def _run_staged(lists: dict[str, list[Tensor]], algorithm: Algorithm, *args, write: bool, stats: bool) -> Tensor:
    """:func:`_run_step` through copies in each parameter's layout (see ``_kernel_strides``),
    written back after an update: the rare path of strided or mismatched layouts."""
    copies: list[tuple[Tensor, Tensor]] | None = [] if write else None
    strides = [_kernel_strides(p) for p in lists["params"]]
    staged = dict(lists)
    for name in ("params", "grads", *(s.name for s in algorithm.streams), MASTER_PARAM):
        staged[name] = _staged(lists[name], strides, copies if name != "grads" else None)
    result = _run_step(staged, algorithm, *args, write=write, stats=stats)
    for original, copy in copies or ():
        original.copy_(copy)
    return result


# ---------------------------------------------------------------------------- ops


def _hypergrad_stats_impl(algorithm: Algorithm, *args, **options) -> Tensor:
    """float32 ``[n, 3]``: per tensor ``g·d_prev``, ``g·g``, ``d_prev·d_prev``; writes nothing."""
    names = ("params", "grads", "steps", *op_streams(algorithm, update=False))
    scalars, grad_scale, clip_coef = args[len(names):]
    lists = dict(zip(names, args))
    return _run_step(lists, algorithm, options, scalars, grad_scale, clip_coef, None, write=False, stats=True)


def _update_impl(algorithm: Algorithm, *args, collect_stats: bool, **options) -> Tensor:
    """Update in place; float32 ``[n, 3]`` statistics with ``collect_stats``, else ``[0, 3]``."""
    names = ("params", "grads", "steps", *op_streams(algorithm, update=True))
    scalars, grad_scale, clip_coef, skip = args[len(names):]
    lists = dict(zip(names, args))
    return _run_step(lists, algorithm, options, scalars, grad_scale, clip_coef, skip, write=True, stats=collect_stats)


def _register_step_ops(algorithm: Algorithm) -> tuple[object, object]:
    """``alr::triton_<name>_hypergrad_stats`` and ``alr::triton_<name>_update_``, their
    schemas from the declaration (:func:`alr.op_args.op_schema`)."""
    stats = torch.library.custom_op(
        f"alr::triton_{algorithm.name}_hypergrad_stats",
        functools.partial(_hypergrad_stats_impl, algorithm),
        mutates_args=(),
        schema=op_schema(algorithm, update=False, per_tensor="scalars"),
    )
    update = torch.library.custom_op(
        f"alr::triton_{algorithm.name}_update_",
        functools.partial(_update_impl, algorithm),
        mutates_args=mutated_lists(algorithm),
        schema=op_schema(algorithm, update=True, per_tensor="scalars"),
    )
    stats.register_fake(hypergrad_stats_fake)
    update.register_fake(update_fake)
    return stats, update


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


_grad_stats_op.register_fake(grad_stats_fake)
_STEP_OPS = {name: _register_step_ops(algorithm) for name, algorithm in ALGORITHMS.items()}
"""Per algorithm: its (statistics, update) custom ops."""


# ------------------------------------------------------------------ backend interface


def grad_stats(bucket: Bucket, grad_scale: Tensor | None) -> Tensor:
    """See :func:`alr.reference.grad_stats`."""
    return _grad_stats_op(bucket.grads, grad_scale)


def hypergrad_stats(
    bucket: Bucket, hyper: GroupHyper, grad_scale: Tensor | None, clip_coef: Tensor | None
) -> Tensor:
    """See :func:`alr.reference.hypergrad_stats`."""
    algorithm = hyper.declaration
    stats_op, _ = _STEP_OPS[algorithm.name]
    lists = op_lists(bucket, algorithm, update=False)
    return stats_op(*lists, _tensor_scalars(bucket, hyper, None), grad_scale, clip_coef, **algorithm.kernel_arguments(hyper))


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
    _, update_op = _STEP_OPS[algorithm.name]
    lists = op_lists(bucket, algorithm, update=True)
    options = algorithm.kernel_arguments(hyper)
    stats = update_op(*lists, _tensor_scalars(bucket, hyper, alphas), grad_scale, clip_coef, skip, collect_stats=collect_stats, **options)
    return stats if collect_stats else None


def _tensor_scalars(bucket: Bucket, hyper: GroupHyper, alphas: Tensor | None) -> Tensor:
    """The declaration's per-tensor scalars, rounded to float32 as the reference rounds them
    (computed on the device with a few torch ops: no host read)."""
    steps = torch.stack(bucket.steps).double()
    alphas = torch.zeros_like(steps) if alphas is None else alphas
    return hyper.declaration.tensor_scalars(hyper, steps, alphas).float()
