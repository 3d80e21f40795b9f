r"""Pure-PyTorch reference backend: the normative statement of the ALR step.

Every backend (``cpu``, ``cuda``, ``triton``) must reproduce these functions, parameters and
all state, within the tolerances of ``tests/helpers.py``. The code favours the order of
operations of ``torch.optim`` over speed, so that with the adaptation off it follows torch's
trajectory to fp32 rounding.

The algorithm
=============

One ``step()`` runs over every parameter ``p`` that has a gradient. Per parameter:

1. **Gradient.** ``g = grad / S`` when a :class:`torch.amp.GradScaler` hands over its scale
   ``S``; ``g = -g`` under ``maximize``; ``g = c · g`` with the clip coefficient ``c``
   (below); and, for Adam with coupled decay and for SGD, ``g = g + λ·p``. All math is done
   in the *opmath* dtype: float32 for 16-bit and 32-bit parameters, float64 for float64 ones.
   State tensors keep the parameter's dtype, as in ``torch.optim``.

2. **Direction** ``d_t``, exactly as ``torch.optim`` computes it:

   * Adam/AdamW (``t`` = the parameter's step after increment)::

         m ← lerp(m, g, 1 − β1);  v ← β2·v + (1 − β2)·g²;  v̂ ← max(v̂, v) if amsgrad else v
         denom = √v̂ / √(1 − β2^t) + ε;   d_t = (m / (1 − β1^t)) / denom

   * SGD: ``b ← μ·b + w·g`` with ``w = 1 − dampening`` (``w = 1`` on the first step, which
     therefore copies ``g`` as torch does); ``d_t = g + μ·b`` (Nesterov), ``b`` (momentum) or
     ``g`` (no momentum).

3. **Update.** ``p ← p·(1 − α·λ)`` for decoupled decay (AdamW), then ``p ← p − α·d_t``, with
   the effective learning rate ``α = κ·lr``. ``lr`` is the param group's learning rate (owned
   by the user and by any LR scheduler); ``κ`` is the adapted multiplier, 1 at start.
   Bias corrections and ``α/(1 − β1^t)`` are computed in float64 from the device step
   tensor, then rounded to opmath, like torch's host-side Python floats (the per-tensor
   scalars of the algorithm's declaration, :attr:`alr.algorithms.Algorithm.tensor_scalars`).

Gradient statistics (optimizer-wide, over every group)
------------------------------------------------------
A read-only pre-pass runs when ``max_grad_norm`` is set or ``skip_nonfinite`` is on:

* ``‖g‖ = sqrt(Σ_p ‖grad_p / S‖²)``; with ``max_grad_norm = M`` the clip coefficient is
  ``c = min(M / (‖g‖ + 1e-6), 1)``, exactly as :func:`torch.nn.utils.clip_grad_norm_`.
* The step is **skipped** when any unscaled gradient element is inf or nan
  (``skip_nonfinite``) or when the GradScaler's ``found_inf`` is set: parameters, every state
  tensor, step counters and ``κ`` stay bit-identical, and ``skipped_steps`` grows by one.

Hypergradient adaptation of κ (Baydin et al., ICLR 2018)
--------------------------------------------------------
For each scope ``S`` (``hypergrad_scope``: the param group, or each tensor) the statistics
are ``dot_S = Σ g_t·d_{t−1}``, ``gg_S = Σ g_t²`` and ``dd_S = Σ d_{t−1}²``, with ``g_t`` the
gradient of step 1 above and ``d_{t−1}`` the previous direction *without* learning rate:

* Adam: recomputed from the state before this step's update, ``d_{t−1} = (m / (1 − β1^{t−1}))
  / (√v̂ / √(1 − β2^{t−1}) + ε)``, evaluated in every backend as ``(m·s) / (√v̂ + ε')`` with
  ``s = √(1 − β2^{t−1}) / (1 − β1^{t−1})`` and ``ε' = ε·√(1 − β2^{t−1})`` (one division per
  element instead of two; both are per-tensor scalars); at ``t = 1`` the state is zero, so
  ``d_0 = 0``. Decoupled weight decay is *not* part of ``d_{t−1}``: it would need
  ``p_{t−2}``, which is not kept, and it is not a gradient direction.
* SGD with heavy-ball momentum: the momentum buffer before the update. SGD without
  momentum and Nesterov SGD store ``d_{t−1}`` in ``hypergrad_prev_direction``.

With ``β`` = ``hypergrad_lr``, ``ρ`` = ``hypergrad_norm_decay`` and the bounds
``[κ_min, κ_max]``:

* ``mult``: ``a_S ← ρ·a_S + (1 − ρ)·gg_S`` (a running mean of ``‖g‖²``, 0 at start),
  ``c = clip(dot_S / (max(√gg_S, √a_S)·√dd_S + tiny), −1, 1)``,
  ``κ_S ← clamp(κ_S·(1 + β·c), κ_min, κ_max)`` (``tiny`` = the smallest normal float32);
* ``add``: ``κ_S ← clamp(κ_S + β·dot_S / lr, κ_min, κ_max)`` (κ unchanged while ``lr = 0``);
* ``off``: ``κ ≡ 1``.

``c`` is the cosine of ``g_t`` and ``d_{t−1}`` (Martínez Rubio's multiplicative rule, which
``ρ = 0`` gives exactly), except that a gradient smaller than its running RMS ``√a_S``
counts with that RMS: once the gradients shrink (a converged or separable problem, where
consecutive gradients stay aligned however small they get and the plain cosine would keep
raising κ until the step diverges) the adaptation fades with them. Early on ``a_S`` is
still below ``gg_S`` and ``c`` is the cosine.

A scope whose statistics are not finite (they overflowed float32) leaves ``κ`` and ``a``
unchanged, as does a skipped step; in tensor scope so does a step in which the tensor has no
gradient (torch.optim does not step it).

By default the statistics gathered while applying step ``t`` update ``κ`` for step ``t + 1``
(one read-modify-write pass). With ``hypergrad_exact`` a read-only pre-pass computes them
first and the updated ``κ`` already drives step ``t`` (the paper's algorithm).

Low precision
-------------
``state_dtype`` (float32 or bfloat16) stores the moments, the momentum buffer and the
previous direction in that dtype instead of the parameter's; the math stays in opmath and
each store rounds to nearest even.

For 16-bit parameters, ``master_weights`` keeps a float32 copy ``master_param`` in the state:
steps 1–3 read and update the master, and the parameter is written in the same pass as its
image rounded to nearest even. Coupled weight decay reads the master too.

Without a master, ``stochastic_rounding`` rounds each new bfloat16 parameter element
stochastically and unbiasedly: with ``x`` the float32 result and ``r`` 16 random bits, the
stored value is the top half of ``bits(x) + r`` (so ``x`` rounds up with probability equal
to its distance from the lower neighbour, in units of the spacing); NaN rounds to nearest.
``r`` comes from a counter-based stream, identical on every backend and reproducible from the
state dict: with ``h`` the 32-bit integer hash :func:`hash32`, the parameter's
``rounding_key`` ``K`` (set once from ``rounding_seed`` and the parameter's index), the step
being taken ``t`` and the element's offset ``i`` in the parameter's memory (``i_lo``,
``i_hi`` its low and high 32 bits)::

    s = h(K ^ h(t));   r = h(h(s ^ i_lo) ^ i_hi) & 0xFFFF

Statistics and adaptive scalars (``κ``, the grad norm, the skip counter) are device tensors:
a step never synchronises with the host. Statistics are accumulated per tensor in opmath and
combined in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .algorithms import PREV_DIRECTION, GroupHyper
from .bucket import Bucket, is_dense

__all__ = [
    "adapt_kappa",
    "clip_coefficient",
    "grad_stats",
    "hash32",
    "hypergrad_stats",
    "rounding_streams",
    "stochastic_round_to_bfloat16",
    "update",
]

STATS_DTYPE = torch.float32
"""dtype of the hypergradient statistics and of κ and ``a``."""


def grad_stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the gradient statistics of ``dtype`` gradients (and so of the grad norm and
    clip coefficient they make): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32

CLIP_EPS = 1e-6
"""Added to the norm before dividing, as in ``torch.nn.utils.clip_grad_norm_``."""

COSINE_TINY = torch.finfo(torch.float32).tiny
"""Keeps the cosine of ``mult`` defined when a norm is zero (then ``dot`` is zero too)."""


MASK32 = 0xFFFFFFFF


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds, constants from Wellons' hash
    prospector, both below 2^31 so that int64 products cannot overflow).

    Args:
        x: int64 tensor of values in ``[0, 2^32)``.

    Returns:
        int64 tensor of hashed values in ``[0, 2^32)``, the shape of ``x``.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def rounding_streams(keys: list[Tensor], steps: list[Tensor]) -> Tensor:
    """The per-tensor stream ``s = h(K ^ h(t))`` of this step: int64 ``[n]`` in ``[0, 2^32)``.

    Args:
        keys: 0-d int64 ``rounding_key`` per parameter.
        steps: 0-d float32 step counters *before* this step (``t`` = step + 1).
    """
    t = torch.stack(steps).to(torch.int64) + 1
    return hash32(torch.stack(keys) ^ hash32(t & MASK32))


def stochastic_round_to_bfloat16(x: Tensor, stream: Tensor, index: Tensor) -> Tensor:
    """``x`` (float32) rounded stochastically to bfloat16 (see the module docstring).

    Args:
        x: float32 values.
        stream: 0-d int64, the tensor's stream ``s`` of this step.
        index: int64 element offsets ``i``, the shape of ``x``.
    """
    random = hash32(hash32(stream ^ (index & MASK32)) ^ (index >> 32)) & 0xFFFF
    bits = x.view(torch.int32).to(torch.int64) & MASK32
    top = ((bits + random) >> 16) & 0xFFFF
    rounded = (top - (top >= 0x8000).to(torch.int64) * 0x10000).to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)


def element_offsets(t: Tensor) -> Tensor:
    """int64 tensor of the shape of ``t``: each element's offset in ``t``'s memory when its
    elements fill one block (contiguous, transposed, channels-last), else its index in
    row-major order (backends step such tensors through a contiguous copy)."""
    flat = torch.arange(t.numel(), device=t.device)
    return flat.as_strided(t.shape, t.stride()) if is_dense(t) else flat.view(t.shape)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32 for 16-bit storage, else the storage dtype."""
    return torch.promote_types(dtype, torch.float32)


def grad_stats(bucket: Bucket, grad_scale: Tensor | None) -> Tensor:
    """Per-tensor gradient statistics of the pre-pass (read-only).

    Returns:
        tensor of shape ``[len(bucket), 2]`` on the bucket's device, of
        :func:`grad_stats_dtype`: the squared L2 norm of ``grad / grad_scale`` and a 0/1 flag
        for any inf or nan element.
    """
    rows = []
    for grad in bucket.grads:
        g = _unscaled(grad, grad_scale, opmath_dtype(grad.dtype))
        norm = torch.linalg.vector_norm(g)
        rows.append(torch.stack([norm.square(), (~torch.isfinite(g)).any().to(norm.dtype)]))
    return _as_stats(rows, bucket, 2, grad_stats_dtype(bucket.dtype))


def hypergrad_stats(
    bucket: Bucket, hyper: GroupHyper, grad_scale: Tensor | None, clip_coef: Tensor | None
) -> Tensor:
    """Per-tensor hypergradient statistics before any update (the ``hypergrad_exact`` pre-pass).

    Returns:
        float32 tensor of shape ``[len(bucket), 3]``: ``g·d_prev``, ``g·g``, ``d_prev·d_prev``.
    """
    scalars = _tensor_scalars(bucket, hyper, None)
    rows = []
    for i in range(len(bucket)):
        g = _effective_grad(bucket, i, hyper, grad_scale, clip_coef)
        rows.append(_dot_and_norms(g, _prev_direction(bucket, i, hyper, scalars[i], g.dtype)))
    return _as_stats(rows, bucket)


def update(
    bucket: Bucket,
    hyper: GroupHyper,
    alphas: Tensor,
    grad_scale: Tensor | None,
    clip_coef: Tensor | None,
    skip: Tensor | None,
    collect_stats: bool,
) -> Tensor | None:
    """Apply one step to every parameter of the bucket, in place.

    Args:
        alphas: float64 tensor ``[len(bucket)]``, the effective learning rate ``κ·lr`` of
            each parameter.
        grad_scale: the GradScaler's scale (0-d), or None.
        clip_coef: the clip coefficient (0-d float32), or None.
        skip: 0-d bool tensor; when true every tensor is left bit-identical. None when the
            step cannot be skipped (the fast path: state is updated in place).
        collect_stats: also return the hypergradient statistics (see ``hypergrad_stats``),
            taken against the state before this update.

    Returns:
        The ``[len(bucket), 3]`` statistics when ``collect_stats``, else None.
    """
    step_fn = _adam_update if hyper.algorithm == "adam" else _sgd_update
    streams = rounding_streams(bucket.rounding_keys, bucket.steps) if bucket.rounding_keys else None
    scalars = _tensor_scalars(bucket, hyper, alphas)
    rows = []
    for i in range(len(bucket)):
        g = _effective_grad(bucket, i, hyper, grad_scale, clip_coef)
        if collect_stats:
            rows.append(_dot_and_norms(g, _prev_direction(bucket, i, hyper, scalars[i], g.dtype)))
        param = step_fn(bucket, i, hyper, g, scalars[i], skip)
        _commit_param(bucket, i, param, skip, None if streams is None else streams[i])
        _commit(bucket.steps[i], bucket.steps[i] + 1, skip)
    return _as_stats(rows, bucket) if collect_stats else None


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """``min(max_norm / (total_norm + 1e-6), 1)``, as ``torch.nn.utils.clip_grad_norm_``."""
    return torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)


def adapt_kappa(
    kappa: Tensor,
    grad_sq_avg: Tensor,
    stats: Tensor,
    lr: float | Tensor,
    hyper: GroupHyper,
    skip: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The hypergradient update of κ and of the running mean ``a`` of ``‖g‖²``.

    Args:
        kappa: float32, shape ``[]`` (group scope) or ``[n]`` (tensor scope).
        grad_sq_avg: ``a``, float32, the shape of ``kappa`` (used by ``mult`` only).
        stats: float32, shape ``kappa.shape + (3,)``: ``dot, gg, dd`` summed over each scope.
        lr: the group's learning rate.
        skip: 0-d bool; when true κ and ``a`` are returned unchanged (as they are for any
            scope whose statistics are not finite).

    Returns:
        The new κ and ``a``, with the shapes, dtype and device of the inputs.
    """
    dot, grad_sq, dir_sq = stats.unbind(-1)
    new_avg = grad_sq_avg
    if hyper.hypergrad == "mult":
        rho = hyper.hypergrad_norm_decay
        new_avg = rho * grad_sq_avg + (1 - rho) * grad_sq
        grad_norm = torch.maximum(grad_sq, new_avg).sqrt()
        cosine = dot / (grad_norm * dir_sq.sqrt() + COSINE_TINY)
        new = kappa * (1 + hyper.hypergrad_lr * cosine.clamp(-1.0, 1.0))
    else:
        lr = torch.as_tensor(lr, dtype=STATS_DTYPE, device=kappa.device).reshape(())
        new = torch.where(lr > 0, kappa + hyper.hypergrad_lr * dot / lr, kappa)
    # Statistics that overflowed float32 (finite gradients near 1e19) carry no direction.
    keep = ~torch.isfinite(stats).all(-1)
    if skip is not None:
        keep = keep | skip
    return (
        torch.where(keep, kappa, new.clamp(hyper.kappa_min, hyper.kappa_max)),
        torch.where(keep, grad_sq_avg, new_avg),
    )


def _tensor_scalars(bucket: Bucket, hyper: GroupHyper, alphas: Tensor | None) -> Tensor:
    """The declaration's per-tensor scalars of the bucket, float64 ``[n, k]``; ``alphas``
    None (a statistics-only pass) counts as zeros."""
    steps = torch.stack(bucket.steps).double() if len(bucket) else torch.zeros(0, dtype=torch.float64)
    if alphas is None:
        alphas = torch.zeros_like(steps)
    return hyper.declaration.tensor_scalars(hyper, steps, alphas.to(steps.device))


def _adam_update(
    bucket: Bucket, i: int, hyper: GroupHyper, g: Tensor, scalars: Tensor, skip: Tensor | None
) -> Tensor:
    """Updates the state of parameter ``i``; returns its new value in opmath (uncommitted)."""
    beta1, beta2 = hyper.betas
    opmath = g.dtype
    decay_factor, neg_step_size, bias_correction2_sqrt = scalars[:3].to(opmath).unbind()
    exp_avgs, exp_avg_sqs = bucket.stream("exp_avg"), bucket.stream("exp_avg_sq")
    param, exp_avg, exp_avg_sq = (_working(t, opmath, skip) for t in (_param_source(bucket, i), exp_avgs[i], exp_avg_sqs[i]))
    if hyper.weight_decay != 0 and hyper.decoupled_weight_decay:
        param.mul_(decay_factor)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    second_moment = exp_avg_sq
    if hyper.amsgrad:
        max_exp_avg_sq = bucket.stream("max_exp_avg_sq")[i]
        second_moment = torch.maximum(max_exp_avg_sq.to(opmath), exp_avg_sq)
        _commit(max_exp_avg_sq, second_moment, skip)
    denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(hyper.eps)
    param.addcdiv_(exp_avg * neg_step_size, denom)
    _commit(exp_avgs[i], exp_avg, skip)
    _commit(exp_avg_sqs[i], exp_avg_sq, skip)
    return param


def _sgd_update(
    bucket: Bucket, i: int, hyper: GroupHyper, g: Tensor, scalars: Tensor, skip: Tensor | None
) -> Tensor:
    opmath = g.dtype
    neg_lr, damp_weight = scalars.unbind()
    direction = g
    if hyper.momentum != 0:
        buffer = bucket.stream("momentum_buffer")[i]
        buf = _working(buffer, opmath, skip)
        buf.mul_(hyper.momentum)
        if hyper.dampening == 0:
            buf.add_(g)
        else:
            buf.add_(g * damp_weight.to(opmath))
        direction = g.add(buf, alpha=hyper.momentum) if hyper.nesterov else buf
        _commit(buffer, buf, skip)
    if hyper.has_stream(PREV_DIRECTION):
        _commit(bucket.stream(PREV_DIRECTION)[i], direction, skip)
    param = _working(_param_source(bucket, i), opmath, skip)
    return param.add_(direction * neg_lr.to(opmath))


def _effective_grad(
    bucket: Bucket, i: int, hyper: GroupHyper, grad_scale: Tensor | None, clip_coef: Tensor | None
) -> Tensor:
    """Step 1 of the algorithm: unscale, maximize, clip, coupled weight decay.

    May return the gradient itself (fp32 with nothing to apply): callers only read it.
    """
    opmath = opmath_dtype(bucket.params[i].dtype)
    g = _unscaled(bucket.grads[i], grad_scale, opmath)
    if hyper.maximize:
        g = -g
    if clip_coef is not None:
        g = g * clip_coef.to(opmath)
    if hyper.coupled_weight_decay:
        g = g.add(_param_source(bucket, i).to(opmath), alpha=hyper.weight_decay)
    return g


def _param_source(bucket: Bucket, i: int) -> Tensor:
    """The value steps 1–3 read: the float32 master copy when kept, else the parameter."""
    return bucket.master_params[i] if bucket.master_params else bucket.params[i]


def _commit_param(bucket: Bucket, i: int, new: Tensor, skip: Tensor | None, stream: Tensor | None) -> None:
    """Write the new parameter value: into the master and its rounded image, or rounded
    stochastically (``stream`` given), or rounded to nearest."""
    if bucket.master_params:
        _commit(bucket.master_params[i], new, skip)
    elif stream is not None:
        new = stochastic_round_to_bfloat16(new, stream, element_offsets(bucket.params[i]))
    _commit(bucket.params[i], new, skip)


def _prev_direction(bucket: Bucket, i: int, hyper: GroupHyper, scalars: Tensor, opmath: torch.dtype) -> Tensor:
    """``d_{t−1}``, the direction of the previous step, from the state before this update."""
    if hyper.algorithm == "sgd":
        source = PREV_DIRECTION if hyper.has_stream(PREV_DIRECTION) else "momentum_buffer"
        return bucket.stream(source)[i].to(opmath)
    scale, shifted_eps = scalars[3:].to(opmath).unbind()
    second_moment = bucket.stream("max_exp_avg_sq" if hyper.amsgrad else "exp_avg_sq")[i]
    return (bucket.stream("exp_avg")[i].to(opmath) * scale).div_(second_moment.to(opmath).sqrt().add_(shifted_eps))


def _dot_and_norms(g: Tensor, prev_direction: Tensor) -> Tensor:
    return torch.stack([(g * prev_direction).sum(), g.square().sum(), prev_direction.square().sum()])


def _unscaled(grad: Tensor, grad_scale: Tensor | None, opmath: torch.dtype) -> Tensor:
    g = grad.to(opmath)
    return g if grad_scale is None else g / grad_scale.to(opmath)


def _working(t: Tensor, opmath: torch.dtype, skip: Tensor | None) -> Tensor:
    """The tensor to compute in: ``t`` itself when it can be updated in place, else a copy.

    A step that may be skipped computes on copies, so the state stays intact until
    ``_commit`` decides.
    """
    return t.to(opmath, copy=skip is not None)


def _commit(dst: Tensor, new: Tensor, skip: Tensor | None) -> None:
    """Write ``new`` into ``dst`` (rounding to its dtype), or keep ``dst`` when ``skip``."""
    if skip is not None:
        new = torch.where(skip, dst.to(new.dtype), new)
    if new is not dst:
        dst.copy_(new)


def _as_stats(rows: list[Tensor], bucket: Bucket, width: int = 3, dtype: torch.dtype = STATS_DTYPE) -> Tensor:
    if not rows:
        return torch.zeros(0, width, dtype=dtype, device=bucket.device)
    return torch.stack(rows).to(dtype)
