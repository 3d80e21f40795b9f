r"""The algorithms alr steps, each declared once.

An :class:`Algorithm` states what the rest of alr derives from:

* its **hyper-parameters**: the param-group keys it reads beyond the shared ones, with
  ``torch.optim``'s validation of them (:attr:`Algorithm.check`);
* its **state streams**: the per-parameter state tensors, each with its state-dict key, its
  dtype rule and the options that need it (:class:`StateStream`). The streams every
  algorithm shares under the low-precision options (the float32 master copy, the
  stochastic-rounding key) are :data:`OPTION_STREAMS`;
* its **per-tensor statistics** (:data:`HYPERGRAD_STATS`, the columns its kernels return);
* its **per-tensor scalars**: the values computed once per tensor and step from the step
  counter and the effective learning rate (bias corrections, step size, ...), as one
  function on device tensors (:attr:`Algorithm.tensor_scalars`), which the reference and the
  Triton backend use; the native kernels compute the same in ``csrc/alr_math.h``.

State creation and bucketing (:mod:`alr.state`, :mod:`alr.plan`), the state-dict dtypes, the
validation layer (:mod:`alr.validation`), the op arguments (:mod:`alr._native`) and the
Triton tables (:mod:`alr._triton`) follow these declarations; none of them names a stream
of an algorithm. The math itself is :mod:`alr.reference`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "ADAM",
    "ALGORITHMS",
    "Algorithm",
    "GRAD_STATS",
    "GroupHyper",
    "HYPERGRAD_STATS",
    "OPTION_STREAMS",
    "SGD",
    "StateStream",
    "algorithm_of",
]

GRAD_STATS = ("grad_sq_sum", "nonfinite")
"""Columns of the per-tensor gradient statistics of the pre-pass: ``Σ (g/S)²``, any inf/nan."""

HYPERGRAD_STATS = ("dot", "grad_sq", "dir_sq")
"""Columns of the per-tensor hypergradient statistics: ``g·d_prev``, ``g·g``, ``d_prev·d_prev``."""

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


@dataclass(frozen=True, init=False)
class GroupHyper:
    """The hyper-parameters of one param group, as a backend sees them.

    The fields are the ones every algorithm has; an algorithm's own hyper-parameters (its
    declaration's ``hyper_parameters``, e.g. ``betas`` or ``momentum``) are read as
    attributes too, with the declared defaults: ``GroupHyper("sgd", 0.1, 0.0, False,
    momentum=0.9).momentum``. ``lr`` is the param group's learning rate (a float, or a
    1-element tensor). The effective learning rate ``alpha = kappa * lr`` reaches the
    backend separately, as a tensor.
    """

    algorithm: str
    lr: float | Tensor
    weight_decay: float
    maximize: bool
    hypergrad: Literal["mult", "add", "off"]
    hypergrad_lr: float
    hypergrad_norm_decay: float
    hypergrad_scope: Literal["group", "tensor"]
    hypergrad_exact: bool
    kappa_min: float
    kappa_max: float
    master_weights: bool
    stochastic_rounding: bool
    state_dtype: torch.dtype | None
    options: tuple[tuple[str, Any], ...]
    """The algorithm's own hyper-parameters, (name, value) in declaration order."""

    def __init__(self, algorithm: str, lr: float | Tensor, weight_decay: float, maximize: bool, **given: Any) -> None:
        declared = ALGORITHMS[algorithm].hyper_parameters
        unknown = sorted(set(given) - set(declared) - set(_SHARED_DEFAULTS))
        if unknown:
            raise TypeError(f"{algorithm} has no hyper-parameter {', '.join(unknown)}")
        values = {"algorithm": algorithm, "lr": lr, "weight_decay": weight_decay, "maximize": maximize}
        values.update({name: given.get(name, default) for name, default in _SHARED_DEFAULTS.items()})
        values["options"] = tuple((name, given.get(name, default)) for name, default in declared.items())
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Called only for names that are not fields: the algorithm's own hyper-parameters.
        for key, value in self.__dict__.get("options", ()):
            if key == name:
                return value
        raise AttributeError(f"{self.__dict__.get('algorithm')} has no hyper-parameter {name!r}")

    @classmethod
    def from_group(cls, group: dict[str, Any], algorithm: str) -> GroupHyper:
        """A param group's hyper-parameters: the shared keys and those its algorithm
        declares. Tensor betas and weight decay are read as Python floats (a host read on
        an accelerator; torch.optim reads them alike)."""
        names = (*SHARED_HYPER_PARAMETERS, *ALGORITHMS[algorithm].hyper_parameters)
        # lr stays as given: it reaches the kernels on the device, through κ·lr.
        return cls(algorithm, **{n: group[n] if n == "lr" else _host_value(group[n]) for n in names})

    @property
    def declaration(self) -> Algorithm:
        return ALGORITHMS[self.algorithm]

    @property
    def adapts(self) -> bool:
        return self.hypergrad != "off"

    @property
    def coupled_weight_decay(self) -> bool:
        """Whether ``λ·p`` is added to the gradient (Adam's L2 decay and SGD's)."""
        return self.weight_decay != 0 and not (self.algorithm == "adam" and self.decoupled_weight_decay)

    def streams(self, param_dtype: torch.dtype) -> tuple[StateStream, ...]:
        """The state streams a parameter of ``param_dtype`` has under these options, in
        declaration order (the algorithm's, then :data:`OPTION_STREAMS`)."""
        return tuple(s for s in (*self.declaration.streams, *OPTION_STREAMS) if s.needed(self, param_dtype))

    def has_stream(self, name: str) -> bool:
        """Whether the algorithm's own stream ``name`` is kept under these options."""
        return any(s.name == name and s.needed(self, None) for s in self.declaration.streams)

    @property
    def state_layout(self) -> tuple:
        """What decides which state tensors a parameter has (a part of the plan cache's key)."""
        return (self.algorithm, *(s.needed(self, None) for s in self.declaration.streams),
                self.master_weights, self.stochastic_rounding, self.state_dtype)  # fmt: skip


_SHARED_DEFAULTS: dict[str, Any] = {
    "hypergrad": "off", "hypergrad_lr": 0.0, "hypergrad_norm_decay": 0.0, "hypergrad_scope": "group",
    "hypergrad_exact": False, "kappa_min": 1e-3, "kappa_max": 1e5, "master_weights": False,
    "stochastic_rounding": False, "state_dtype": None,
}  # fmt: skip
"""The ALR options every algorithm has, with the defaults a :class:`GroupHyper` made by hand
gets (the optimizer passes every one)."""

SHARED_HYPER_PARAMETERS = ("lr", "weight_decay", "maximize", *_SHARED_DEFAULTS)
"""The param-group keys of :class:`GroupHyper` that every algorithm has."""


def _host_value(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(_host_value(v) for v in value)
    return float(value) if isinstance(value, Tensor) else value


@dataclass(frozen=True)
class StateStream:
    """A per-parameter state tensor of an algorithm.

    Attributes:
        name: its key in ``optimizer.state[p]`` (torch.optim's name where torch has one).
        dtype: ``"state"``: the group's state dtype (:func:`state_dtype_for`); ``"float32"``;
            ``"int64"`` (a 0-d tensor, not shaped like the parameter).
        needed: whether a parameter of the given dtype keeps it under the group's options
            (called with dtype None, it answers for the options alone).
        init: ``"zeros"`` (the shape, layout and dtype rule above), ``"param"`` (a float32
            copy of the parameter) or ``"key"`` (the stochastic-rounding key).
        doc: what it holds.
    """

    name: str
    dtype: Literal["state", "float32", "int64"]
    needed: Callable[[GroupHyper, torch.dtype | None], bool]
    init: Literal["zeros", "param", "key"]
    doc: str

    @property
    def elementwise(self) -> bool:
        """Shaped like its parameter (every stream but the 0-d rounding key)."""
        return self.dtype != "int64"

    def dtype_for(self, param: Tensor, hyper: GroupHyper) -> torch.dtype:
        if self.dtype == "float32":
            return torch.float32
        if self.dtype == "int64":
            return torch.int64
        return state_dtype_for(param.dtype, hyper.state_dtype, hyper.master_weights, hyper.stochastic_rounding)


def state_dtype_for(
    param_dtype: torch.dtype, state_dtype: torch.dtype | None, master_weights: bool, stochastic_rounding: bool
) -> torch.dtype:
    """The dtype of the ``"state"`` streams of a parameter (see the ``state_dtype`` argument
    of :class:`alr.ALROptimizer`)."""
    if state_dtype is not None:
        return state_dtype
    if (master_weights or stochastic_rounding) and param_dtype in SIXTEEN_BIT:
        return torch.float32
    return param_dtype


@dataclass(frozen=True)
class Algorithm:
    """One algorithm's declaration (see the module docstring).

    Attributes:
        name: the value of :attr:`GroupHyper.algorithm`.
        hyper_parameters: its param-group keys beyond the shared ones (``lr``,
            ``weight_decay``, ``maximize`` and the ALR options), with torch's defaults.
        streams: its own state streams, in the order its kernels take them.
        check: raises, with torch.optim's exception types and messages, for invalid
            constructor arguments (``lr``, ``weight_decay`` and the hyper-parameters).
        kernel_hyper: the hyper-parameters its kernel ops take as the op argument
            ``float[] hyper``, in order (its comment names them; ``csrc/op_inputs.h``
            reads them in that order).
        kernel_flags: the boolean options its kernel ops take as named arguments. (What
            the presence of a stream tells, such as amsgrad, is not passed: an op sees it
            from the stream's list being empty or not.)
        scalar_columns: names of the per-tensor scalars, the columns of ``tensor_scalars``.
        tensor_scalars: ``(hyper, steps, alphas) -> float64 [n, len(scalar_columns)]`` on
            the device of ``steps``, from the step counters *before* this step (float64
            ``[n]``) and the effective learning rates (float64 ``[n]``, zeros for a
            statistics-only pass). Callers round the columns to opmath.
    """

    name: str
    hyper_parameters: dict[str, Any]
    streams: tuple[StateStream, ...]
    check: Callable[..., None]
    kernel_hyper: Callable[[GroupHyper], tuple[float, ...]]
    kernel_flags: tuple[str, ...]
    scalar_columns: tuple[str, ...]
    tensor_scalars: Callable[[GroupHyper, Tensor, Tensor], Tensor]

    def kernel_arguments(self, hyper: GroupHyper) -> dict[str, Any]:
        """The keyword arguments of its kernel ops: ``hyper`` (floats) and the flags."""
        return {"hyper": [float(value) for value in self.kernel_hyper(hyper)],
                **{name: bool(getattr(hyper, name)) for name in self.kernel_flags}}  # fmt: skip


# --------------------------------------------------------------------------- streams

MASTER_PARAM = "master_param"
ROUNDING_KEY = "rounding_key"
PREV_DIRECTION = "hypergrad_prev_direction"

OPTION_STREAMS = (
    StateStream(
        MASTER_PARAM, "float32",
        lambda h, dtype: h.master_weights and (dtype is None or dtype in SIXTEEN_BIT),
        "param", "the float32 master copy of a 16-bit parameter (master_weights)",
    ),
    StateStream(
        ROUNDING_KEY, "int64",
        lambda h, dtype: h.stochastic_rounding and not h.master_weights and dtype in (None, torch.bfloat16),
        "key", "the 0-d key of a bfloat16 parameter's stochastic-rounding stream",
    ),
)  # fmt: skip
"""Streams of the low-precision options, shared by every algorithm (after its own)."""


# ------------------------------------------------------------------------------ Adam


def _check_adam(lr, weight_decay, *, betas, eps, foreach, capturable, **_) -> None:
    """torch.optim.Adam's checks, with its exception types and messages."""
    if isinstance(lr, Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for index in (0, 1):
        if not 0.0 <= betas[index] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not (all(isinstance(b, float) for b in betas[:2]) or all(isinstance(b, Tensor) for b in betas[:2])):
        raise ValueError("betas must be either both floats or both Tensors")
    for index in (0, 1):
        if isinstance(betas[index], Tensor):
            if not capturable and foreach:
                raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True")
            if betas[index].numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")


def _adam_scalars(hyper: GroupHyper, steps: Tensor, alphas: Tensor) -> Tensor:
    """Columns ``ADAM.scalar_columns``; ``t`` = step + 1, the previous step's corrections at
    ``t' = max(t − 1, 1)`` (the moments are zero at step 0: ``d_0 = 0`` and they stay finite)."""
    beta1, beta2 = hyper.betas
    step = steps + 1
    prev = steps.clamp(min=1)
    decoupled = hyper.decoupled_weight_decay and hyper.weight_decay != 0
    prev_bias_correction2_sqrt = (1 - beta2**prev).sqrt()
    columns = (
        1 - alphas * hyper.weight_decay if decoupled else torch.ones_like(step),
        -alphas / (1 - beta1**step),
        (1 - beta2**step).sqrt(),
        prev_bias_correction2_sqrt / (1 - beta1**prev),
        hyper.eps * prev_bias_correction2_sqrt,
    )
    return torch.stack(columns, dim=1)


ADAM = Algorithm(
    name="adam",
    hyper_parameters={"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "decoupled_weight_decay": False},
    streams=(
        StateStream("exp_avg", "state", lambda h, dtype: True, "zeros", "m, the first moment"),
        StateStream("exp_avg_sq", "state", lambda h, dtype: True, "zeros", "v, the second moment"),
        StateStream("max_exp_avg_sq", "state", lambda h, dtype: h.amsgrad, "zeros", "v̂ = max over steps of v (amsgrad)"),
    ),
    check=_check_adam,
    kernel_hyper=lambda h: (*h.betas, h.eps, h.weight_decay),  # beta1, beta2, eps, weight_decay
    kernel_flags=("decoupled_weight_decay", "maximize"),
    scalar_columns=("decay_factor", "neg_step_size", "bias_correction2_sqrt", "prev_direction_scale", "prev_direction_eps"),
    tensor_scalars=_adam_scalars,
)  # fmt: skip
"""Adam (coupled L2 decay) and AdamW (``decoupled_weight_decay``), torch.optim's."""


# ------------------------------------------------------------------------------- SGD


def _check_sgd(lr, weight_decay, *, momentum, **_) -> None:
    """torch.optim.SGD's checks, with its exception types and messages (Nesterov's are per group)."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _sgd_scalars(hyper: GroupHyper, steps: Tensor, alphas: Tensor) -> Tensor:
    """Columns ``SGD.scalar_columns``. The damping weight is ``1 − dampening`` in float64 (as
    torch's Python float), 1 on the first step; a kernel rounds it to its opmath once."""
    damp = torch.ones_like(steps)
    if hyper.dampening != 0:
        damp = torch.where(steps == 0, damp, torch.full_like(steps, 1.0 - hyper.dampening))
    return torch.stack([-alphas, damp], dim=1)


def _needs_prev_direction(hyper: GroupHyper, dtype: torch.dtype | None) -> bool:
    """``d_{t−1}`` needs a buffer of its own unless it is the heavy-ball momentum buffer."""
    return hyper.adapts and (hyper.momentum == 0 or hyper.nesterov)


SGD = Algorithm(
    name="sgd",
    hyper_parameters={"momentum": 0.0, "dampening": 0.0, "nesterov": False},
    streams=(
        StateStream("momentum_buffer", "state", lambda h, dtype: h.momentum != 0, "zeros", "b, the momentum buffer"),
        StateStream(PREV_DIRECTION, "state", _needs_prev_direction, "zeros",
                    "d_{t-1}, the previous direction (SGD without momentum, Nesterov SGD)"),
    ),
    check=_check_sgd,
    kernel_hyper=lambda h: (h.momentum, h.dampening, h.weight_decay),
    kernel_flags=("nesterov", "maximize"),
    scalar_columns=("neg_lr", "damp_weight"),
    tensor_scalars=_sgd_scalars,
)  # fmt: skip
"""SGD with optional heavy-ball or Nesterov momentum and dampening, torch.optim's."""


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (ADAM, SGD)}

_PUBLIC_NAMES = {"adam": "adam", "adamw": "adam", "sgd": "sgd"}


def algorithm_of(public_name: str) -> Algorithm:
    """The declaration behind ``ALROptimizer(algorithm=public_name)``."""
    if public_name not in _PUBLIC_NAMES:
        raise ValueError(f"Invalid algorithm: {public_name!r}. Expected one of {list(_PUBLIC_NAMES)}")
    return ALGORITHMS[_PUBLIC_NAMES[public_name]]
