"""Triton kernels of the ALR step: one launch per bucket, whatever its tensor count.

The math is :mod:`alr.reference`'s (its docstring is the normative statement); this module
only moves it onto the GPU. A bucket's tensors are cut into chunks of ``BLOCK`` elements,
and one program handles one chunk of one tensor. Programs find their tensor through
device-resident metadata built by :class:`alr._triton.Layout`:

* ``chunk_tensor`` (int32 ``[chunks]``) and ``chunk_start`` (int64 ``[chunks]``): the
  tensor and first element of each chunk, tensor-major;
* ``numels`` (int64 ``[n]``);
* pointer tables (int64): ``state_ptrs`` ``[streams, n]`` holds the data pointers of the
  parameters and state tensors, ``grad_ptrs`` ``[n]`` those of the gradients;
* per-tensor scalars (float32 ``[n, k]``), computed on the device by torch in float64 and
  rounded exactly as the reference rounds them (bias corrections, ``-α/bc1``, ...).

Every statistic is reduced deterministically: a program sums its chunk with ``tl.sum`` into
its own row of ``partials``, and :func:`sum_chunks_kernel` adds each tensor's rows in chunk
order. Hyper-parameters are runtime arguments (a new lr or beta never recompiles); the
``tl.constexpr`` arguments only choose the code path (storage dtype, options that change
which tensors exist) and the block size. Nothing here is autotuned: an in-place kernel run
several times by an autotuner would apply the step several times.

Device scalars (the GradScaler's scale, the clip coefficient, the skip flag) are read by
pointer, so a step never reads anything back to the host and can be captured in a CUDA
graph. A skipped step writes nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "ADAM_SCALARS",
    "ADAM_STREAMS",
    "SGD_SCALARS",
    "SGD_STREAMS",
    "adam_kernel",
    "grad_stats_kernel",
    "sgd_kernel",
    "sum_chunks_kernel",
]

ADAM_STREAMS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
"""Rows of the Adam kernel's ``state_ptrs``: the parameter, the streams of
``alr.algorithms.ADAM`` in declaration order (``max_exp_avg_sq`` read only with amsgrad),
the master copies (only with master weights; ``MASTER_ROW``)."""
ADAM_SCALARS = ("decay_factor", "neg_step_size", "bias_correction2_sqrt", "prev_direction_scale",
                "prev_direction_eps")  # fmt: skip
"""Columns of the Adam kernel's per-tensor scalars (``alr.algorithms.ADAM.scalar_columns``)."""
SGD_STREAMS = ("param", "momentum_buffer", "hypergrad_prev_direction", "master_param")
"""Rows of the SGD kernel's ``state_ptrs``, as ``ADAM_STREAMS`` for ``alr.algorithms.SGD``: a
stream is read only where the options keep it (``MOMENTUM``, ``STORE_PREV``, ``MASTER``)."""
SGD_SCALARS = ("neg_lr", "damp_weight")
"""Columns of the SGD kernel's per-tensor scalars (``alr.algorithms.SGD.scalar_columns``)."""


@triton.jit
def _stream(ptrs, row, n_tensors, tensor, dtype: tl.constexpr):
    """The data pointer of stream ``row`` of ``tensor``, typed ``dtype``."""
    return tl.load(ptrs + row * n_tensors + tensor).to(tl.pointer_type(dtype))


@triton.jit
def _chunk(chunk_tensor, chunk_start, numels, BLOCK: tl.constexpr):
    """This program's tensor, its element count and the element offsets of its chunk."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor + chunk)
    offsets = tl.load(chunk_start + chunk) + tl.arange(0, BLOCK).to(tl.int64)
    return chunk, tensor, tl.load(numels + tensor), offsets


@triton.jit
def _effective_grad(grad, param, grad_scale, clip_coef, grad_sign, weight_decay,
                    HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, COUPLED_DECAY: tl.constexpr):  # fmt: skip
    """Step 1 of the reference: unscale, maximize, clip, coupled weight decay (float32)."""
    g = grad
    if HAS_SCALE:
        g = g / tl.load(grad_scale).to(tl.float32)
    g = g * grad_sign
    if HAS_CLIP:
        g = g * tl.load(clip_coef).to(tl.float32)
    if COUPLED_DECAY:
        g = g + weight_decay * param
    return g


@triton.jit
def _to_storage(x, STORAGE: tl.constexpr):
    """float32 to the storage dtype, rounding to nearest even (as torch does). For bfloat16
    the rounding is spelt out on the bits: Triton's interpreter truncates in ``.to()``."""
    if STORAGE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # every NaN: the canonical quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(STORAGE)


@triton.jit
def _hash32(x):
    """:func:`alr.reference.hash32` on uint32 (products wrap modulo 2^32)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _round_stochastic_bf16(x, stream, offsets):
    """float32 to bfloat16, rounded stochastically as :func:`alr.reference.
    stochastic_round_to_bfloat16` does, element ``offsets`` of a tensor with ``stream``."""
    low = (offsets & 0xFFFFFFFF).to(tl.uint32)
    high = (offsets >> 32).to(tl.uint32)
    random = _hash32(_hash32(stream ^ low) ^ high) & 0xFFFF
    bits = x.to(tl.uint32, bitcast=True)
    rounded = tl.where(x != x, 0x7FC0, (bits + random) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_param(state_ptrs, n_tensors, tensor, offsets, mask, STORAGE: tl.constexpr,
                MASTER: tl.constexpr, MASTER_ROW: tl.constexpr):  # fmt: skip
    """The parameter's pointer and its value in float32: from the master copy when kept."""
    param_ptr = _stream(state_ptrs, 0, n_tensors, tensor, STORAGE) + offsets
    if MASTER:
        master_ptr = _stream(state_ptrs, MASTER_ROW, n_tensors, tensor, tl.float32) + offsets
        p = tl.load(master_ptr, mask=mask, other=0.0)
    else:
        p = tl.load(param_ptr, mask=mask, other=0.0).to(tl.float32)
    return param_ptr, p


@triton.jit
def _store_param(p, param_ptr, state_ptrs, n_tensors, tensor, offsets, mask, rounding_streams,
                 STORAGE: tl.constexpr, MASTER: tl.constexpr, MASTER_ROW: tl.constexpr,
                 STOCHASTIC: tl.constexpr):  # fmt: skip
    """Write the new parameter: the master and its rounded image, or rounded stochastically
    (bfloat16), or rounded to nearest even."""
    if MASTER:
        master_ptr = _stream(state_ptrs, MASTER_ROW, n_tensors, tensor, tl.float32) + offsets
        tl.store(master_ptr, p, mask=mask)
        tl.store(param_ptr, _to_storage(p, STORAGE), mask=mask)
    elif STOCHASTIC:
        stream = tl.load(rounding_streams + tensor).to(tl.uint32)
        tl.store(param_ptr, _round_stochastic_bf16(p, stream, offsets), mask=mask)
    else:
        tl.store(param_ptr, _to_storage(p, STORAGE), mask=mask)


@triton.jit
def _write_mask(offsets, numel, skip, HAS_SKIP: tl.constexpr):
    """The elements to store: none when the step is skipped. (The skip flag enters the
    bound, not a ``&`` with the mask: Triton's interpreter rejects a vector-and-scalar mask.)"""
    if HAS_SKIP:
        numel = numel * (1 - tl.load(skip).to(tl.int64))
    return offsets < numel


@triton.jit
def _store_stats(partials, chunk, g, d, mask):
    """``Σ g·d``, ``Σ g²``, ``Σ d²`` of this chunk into its row of ``partials``."""
    g = tl.where(mask, g, 0.0)
    d = tl.where(mask, d, 0.0)
    tl.store(partials + chunk * 3 + 0, tl.sum(g * d, axis=0))
    tl.store(partials + chunk * 3 + 1, tl.sum(g * g, axis=0))
    tl.store(partials + chunk * 3 + 2, tl.sum(d * d, axis=0))


@triton.jit
def adam_kernel(
    state_ptrs,  # int64 [len(ADAM_STREAMS), n]
    grad_ptrs,  # int64 [n]
    chunk_tensor,  # int32 [chunks]
    chunk_start,  # int64 [chunks]
    numels,  # int64 [n]
    scalars,  # float32 [n, len(ADAM_SCALARS)]
    grad_scale,  # 0-d: divides the gradient (HAS_SCALE)
    clip_coef,  # 0-d float32: multiplies the gradient (HAS_CLIP)
    skip,  # 0-d bool: write nothing when true (HAS_SKIP)
    partials,  # float32 [chunks, 3]: the chunk's g·d_prev, g², d_prev² (STATS)
    rounding_streams,  # int64 [n]: each tensor's stream of this step (STOCHASTIC)
    n_tensors,
    grad_sign,  # -1.0 under maximize, else 1.0
    lerp_weight,  # 1 - β1
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    STORAGE: tl.constexpr,  # dtype of parameters and gradients
    STATE: tl.constexpr,  # dtype of the moments
    HAS_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    COUPLED_DECAY: tl.constexpr,  # Adam's L2 decay, added to the gradient
    AMSGRAD: tl.constexpr,
    MASTER: tl.constexpr,  # float32 master copies in row MASTER_ROW
    MASTER_ROW: tl.constexpr,
    STOCHASTIC: tl.constexpr,  # round the bfloat16 parameter stochastically
    WRITE: tl.constexpr,  # update in place (False: statistics only)
    STATS: tl.constexpr,  # write the hypergradient statistics of d_prev
    BLOCK: tl.constexpr,
):
    """One Adam/AdamW step (or its statistics) on one chunk; see the module docstring."""
    chunk, tensor, numel, offsets = _chunk(chunk_tensor, chunk_start, numels, BLOCK)
    mask = offsets < numel
    param_ptr, p = _load_param(state_ptrs, n_tensors, tensor, offsets, mask, STORAGE, MASTER, MASTER_ROW)
    exp_avg_ptr = _stream(state_ptrs, 1, n_tensors, tensor, STATE) + offsets
    exp_avg_sq_ptr = _stream(state_ptrs, 2, n_tensors, tensor, STATE) + offsets
    grad_ptr = tl.load(grad_ptrs + tensor).to(tl.pointer_type(STORAGE)) + offsets

    m = tl.load(exp_avg_ptr, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr, mask=mask, other=0.0).to(tl.float32)
    g = _effective_grad(g, p, grad_scale, clip_coef, grad_sign, weight_decay, HAS_SCALE, HAS_CLIP, COUPLED_DECAY)
    if AMSGRAD:
        max_exp_avg_sq_ptr = _stream(state_ptrs, 3, n_tensors, tensor, STATE) + offsets
        v_max = tl.load(max_exp_avg_sq_ptr, mask=mask, other=0.0).to(tl.float32)
        second_moment = v_max
    else:
        second_moment = v

    row = scalars + tensor * 5
    if STATS:
        # d_{t-1} from the moments before this step, with the previous step's corrections
        # folded into a scale and a shifted eps (the reference's one-division form).
        d_prev = (m * tl.load(row + 3)) / (tl.sqrt(second_moment) + tl.load(row + 4))
        _store_stats(partials, chunk, g, d_prev, mask)

    if WRITE:
        p = p * tl.load(row + 0)
        # torch.lerp(m, g, w): m + w·(g - m) for |w| < 0.5, else g - (g - m)·(1 - w).
        if lerp_weight < 0.5:
            m = m + lerp_weight * (g - m)
        else:
            m = g - (g - m) * (1.0 - lerp_weight)
        v = v * beta2 + (one_minus_beta2 * g) * g
        if AMSGRAD:
            v_max = tl.maximum(v_max, v)
            second_moment = v_max
        else:
            second_moment = v
        denom = tl.sqrt(second_moment) / tl.load(row + 2) + eps
        p = p + (m * tl.load(row + 1)) / denom
        mask = _write_mask(offsets, numel, skip, HAS_SKIP)
        _store_param(p, param_ptr, state_ptrs, n_tensors, tensor, offsets, mask, rounding_streams,
                     STORAGE, MASTER, MASTER_ROW, STOCHASTIC)  # fmt: skip
        tl.store(exp_avg_ptr, _to_storage(m, STATE), mask=mask)
        tl.store(exp_avg_sq_ptr, _to_storage(v, STATE), mask=mask)
        if AMSGRAD:
            tl.store(max_exp_avg_sq_ptr, _to_storage(v_max, STATE), mask=mask)


@triton.jit
def sgd_kernel(
    state_ptrs,  # int64 [len(SGD_STREAMS), n]
    grad_ptrs,  # int64 [n]
    chunk_tensor,  # int32 [chunks]
    chunk_start,  # int64 [chunks]
    numels,  # int64 [n]
    scalars,  # float32 [n, len(SGD_SCALARS)]
    grad_scale,  # 0-d (HAS_SCALE)
    clip_coef,  # 0-d float32 (HAS_CLIP)
    skip,  # 0-d bool (HAS_SKIP)
    partials,  # float32 [chunks, 3] (STATS)
    rounding_streams,  # int64 [n] (STOCHASTIC)
    n_tensors,
    grad_sign,  # -1.0 under maximize, else 1.0
    momentum,
    weight_decay,
    STORAGE: tl.constexpr,
    STATE: tl.constexpr,  # dtype of the momentum buffer and the previous direction
    HAS_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    COUPLED_DECAY: tl.constexpr,  # weight_decay != 0
    MOMENTUM: tl.constexpr,  # momentum != 0: the buffer exists
    NESTEROV: tl.constexpr,
    STORE_PREV: tl.constexpr,  # d_t is kept in prev_direction (and d_{t-1} read from it)
    MASTER: tl.constexpr,
    MASTER_ROW: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    WRITE: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One SGD step (or its statistics) on one chunk; see the module docstring."""
    chunk, tensor, numel, offsets = _chunk(chunk_tensor, chunk_start, numels, BLOCK)
    mask = offsets < numel
    param_ptr, p = _load_param(state_ptrs, n_tensors, tensor, offsets, mask, STORAGE, MASTER, MASTER_ROW)
    grad_ptr = tl.load(grad_ptrs + tensor).to(tl.pointer_type(STORAGE)) + offsets
    g = tl.load(grad_ptr, mask=mask, other=0.0).to(tl.float32)
    g = _effective_grad(g, p, grad_scale, clip_coef, grad_sign, weight_decay, HAS_SCALE, HAS_CLIP, COUPLED_DECAY)
    if MOMENTUM:
        buffer_ptr = _stream(state_ptrs, 1, n_tensors, tensor, STATE) + offsets
        b = tl.load(buffer_ptr, mask=mask, other=0.0).to(tl.float32)
    if STORE_PREV:
        prev_ptr = _stream(state_ptrs, 2, n_tensors, tensor, STATE) + offsets

    if STATS:
        if STORE_PREV:
            d_prev = tl.load(prev_ptr, mask=mask, other=0.0).to(tl.float32)
        else:
            d_prev = b
        _store_stats(partials, chunk, g, d_prev, mask)

    if WRITE:
        direction = g
        if MOMENTUM:
            b = b * momentum + g * tl.load(scalars + tensor * 2 + 1)
            if NESTEROV:
                direction = g + momentum * b
            else:
                direction = b
        p = p + direction * tl.load(scalars + tensor * 2 + 0)
        mask = _write_mask(offsets, numel, skip, HAS_SKIP)
        _store_param(p, param_ptr, state_ptrs, n_tensors, tensor, offsets, mask, rounding_streams,
                     STORAGE, MASTER, MASTER_ROW, STOCHASTIC)  # fmt: skip
        if MOMENTUM:
            tl.store(buffer_ptr, _to_storage(b, STATE), mask=mask)
        if STORE_PREV:
            tl.store(prev_ptr, _to_storage(direction, STATE), mask=mask)


@triton.jit
def grad_stats_kernel(
    grad_ptrs,  # int64 [n]
    chunk_tensor,  # int32 [chunks]
    chunk_start,  # int64 [chunks]
    numels,  # int64 [n]
    grad_scale,  # 0-d (HAS_SCALE)
    partials,  # float32 [chunks, 2]: Σ (grad/S)², number of inf/nan elements
    STORAGE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The read-only statistics pre-pass of one chunk."""
    chunk, tensor, numel, offsets = _chunk(chunk_tensor, chunk_start, numels, BLOCK)
    mask = offsets < numel
    grad_ptr = tl.load(grad_ptrs + tensor).to(tl.pointer_type(STORAGE)) + offsets
    g = tl.load(grad_ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(grad_scale).to(tl.float32)
    # g - g is 0 for a finite g and NaN for inf or NaN.
    nonfinite = mask & ((g - g) != 0.0)
    g = tl.where(mask, g, 0.0)
    tl.store(partials + chunk * 2 + 0, tl.sum(g * g, axis=0))
    tl.store(partials + chunk * 2 + 1, tl.sum(nonfinite.to(tl.float32), axis=0))


@triton.jit
def sum_chunks_kernel(
    partials,  # float32 [chunks, WIDTH]
    tensor_chunks,  # int32 [n + 1]: tensor t owns chunks [tensor_chunks[t], tensor_chunks[t + 1])
    out,  # float32 [n, WIDTH]
    WIDTH: tl.constexpr,  # at most 4
    ROWS: tl.constexpr,  # chunks summed per iteration
):
    """Per tensor, the sum of its chunks' statistics, in chunk order (deterministic)."""
    tensor = tl.program_id(0)
    first = tl.load(tensor_chunks + tensor)
    last = tl.load(tensor_chunks + tensor + 1)
    columns = tl.arange(0, 4)  # WIDTH rounded up to a power of two, as tl.arange needs
    total = tl.zeros((4,), dtype=tl.float32)
    for start in range(first, last, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = (rows < last)[:, None] & (columns < WIDTH)[None, :]
        total += tl.sum(tl.load(partials + rows[:, None] * WIDTH + columns[None, :], mask=mask, other=0.0), axis=0)
    tl.store(out + tensor * WIDTH + columns, total, mask=columns < WIDTH)
