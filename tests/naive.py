"""A deliberately naive float64 model of the ALR step, the oracle of the hypergradient tests.

It is written from the normative docstring of :mod:`alr.reference`, not from alr's code.
Every parameter and state tensor is a list of Python floats, every element is visited by a
plain ``for`` loop, and the only math is Python's float arithmetic and :mod:`math`. Torch is
used at the edges only: to read tensors in (``.double().flatten().tolist()``) and to hand
results back as float64 tensors for comparison.

The constructor mirrors :class:`alr.ALROptimizer` (same keyword names and defaults), so a
test can build both from one set of keyword arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["NaiveALR"]

TINY = 2.0**-126
"""The smallest normal float32: keeps the cosine of ``mult`` defined when a norm is zero."""

CLIP_EPS = 1e-6
"""Added to the global norm before dividing, as in ``torch.nn.utils.clip_grad_norm_``."""

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "hypergrad_prev_direction")


@dataclass
class Hyper:
    """One param group's hyper-parameters, with alr's names."""

    algorithm: str
    lr: float
    weight_decay: float
    decoupled: bool
    betas: tuple[float, float]
    eps: float
    amsgrad: bool
    momentum: float
    dampening: float
    nesterov: bool
    maximize: bool
    hypergrad: str
    hypergrad_lr: float
    hypergrad_norm_decay: float
    hypergrad_scope: str
    hypergrad_exact: bool
    kappa_min: float
    kappa_max: float

    @property
    def adapts(self) -> bool:
        return self.hypergrad != "off"

    @property
    def heavy_ball(self) -> bool:
        """SGD whose direction is the momentum buffer itself."""
        return self.algorithm == "sgd" and self.momentum != 0 and not self.nesterov

    @property
    def coupled_decay(self) -> bool:
        """Weight decay added to the gradient (SGD, and Adam without decoupling)."""
        return self.weight_decay != 0 and not self.decoupled


class NaiveParam:
    """A parameter as a flat list of floats, with its state as flat lists and an int step."""

    def __init__(self, tensor: Tensor) -> None:
        self.shape = tuple(tensor.shape)
        self.values = _floats(tensor)
        self.step = 0
        self.state: dict[str, list[float]] = {}

    def buffer(self, key: str) -> list[float]:
        """State buffer ``key``, zero until first written."""
        if key not in self.state:
            self.state[key] = [0.0] * len(self.values)
        return self.state[key]


class NaiveGroup:
    """A param group: its hyper-parameters, parameters, and κ with the running mean of ‖g‖²
    (one each, or one each per parameter)."""

    def __init__(self, hyper: Hyper, params: list[NaiveParam]) -> None:
        self.hyper = hyper
        self.params = params
        scopes = 1 if hyper.hypergrad_scope == "group" else len(params)
        self.kappa = [1.0] * scopes
        self.grad_sq_avg = [0.0] * scopes

    def kappa_of(self, position: int) -> float:
        if self.hyper.hypergrad == "off":
            return 1.0
        return self.kappa[0 if self.hyper.hypergrad_scope == "group" else position]


class NaiveALR:
    """The naive model of :class:`alr.ALROptimizer` (see the module docstring).

    Args:
        params: parameter tensors, or param-group dicts with ``"params"`` and overrides.
        The other arguments are :class:`alr.ALROptimizer`'s (``backend`` and torch's
        implementation flags are accepted and ignored).
    """

    def __init__(
        self,
        params: Sequence[Any],
        lr: float = 1e-3,
        *,
        algorithm: str = "adamw",
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = True,
        **options: Any,
    ) -> None:
        options.pop("backend", None)
        groups = list(params)
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.groups = [
            NaiveGroup(_hyper(algorithm, {"lr": lr, **options, **group}), [NaiveParam(p) for p in group["params"]])
            for group in groups
        ]
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.grad_norm = math.nan
        self.skipped_steps = 0

    # ----------------------------------------------------------------------------- step

    def step(
        self, grads: Sequence[Tensor | None], grad_scale: float | None = None, found_inf: bool = False
    ) -> None:
        """One step; ``grads`` holds one gradient (or None) per parameter, in group order."""
        unscaled = [None if g is None else _unscaled(_floats(g), grad_scale) for g in grads]
        clip, nonfinite = None, False
        if self.max_grad_norm is not None or self.skip_nonfinite:
            self.grad_norm = _global_norm(unscaled)
            nonfinite = any(not math.isfinite(x) for g in unscaled if g is not None for x in g)
            if self.max_grad_norm is not None:
                clip = min(self.max_grad_norm / (self.grad_norm + CLIP_EPS), 1.0)
        if (self.skip_nonfinite and nonfinite) or found_inf:
            self.skipped_steps += 1
            return
        start = 0
        for group in self.groups:
            self._step_group(group, unscaled[start : start + len(group.params)], clip)
            start += len(group.params)

    def _step_group(self, group: NaiveGroup, grads: list[list[float] | None], clip: float | None) -> None:
        """Statistics, κ adaptation (before or after) and the update of one param group."""
        h = group.hyper
        live = [(pos, group.params[pos], g) for pos, g in enumerate(grads) if g is not None]
        if not live:
            return
        effective = [_effective_grad(h, p.values, g, clip) for _, p, g in live]
        if h.adapts:
            stats = [_hypergrad_stats(g, _prev_direction(h, p)) for (_, p, _), g in zip(live, effective)]
        if h.adapts and h.hypergrad_exact:
            _adapt(group, [pos for pos, _, _ in live], stats)
        for (pos, p, _), g in zip(live, effective):
            alpha = group.kappa_of(pos) * h.lr
            if h.algorithm == "adam":
                _adam_update(h, p, g, alpha)
            else:
                _sgd_update(h, p, g, alpha)
            p.step += 1
        if h.adapts and not h.hypergrad_exact:
            _adapt(group, [pos for pos, _, _ in live], stats)

    # ---------------------------------------------------------------------- read-outs

    @property
    def all_params(self) -> list[NaiveParam]:
        return [p for group in self.groups for p in group.params]

    def params(self) -> list[Tensor]:
        """The parameters as float64 tensors of their original shapes, in group order."""
        return [_tensor(p.values, p.shape) for p in self.all_params]

    def state(self, index: int) -> dict[str, Tensor | float]:
        """State of parameter ``index`` (group order): ``step`` and every buffer the spec keeps."""
        p = self.all_params[index]
        state: dict[str, Tensor | float] = {"step": float(p.step)}
        state.update((key, _tensor(values, p.shape)) for key, values in p.state.items())
        return state

    def kappas(self) -> list[Tensor]:
        """Per param group, κ of each parameter (float64 ``[len(params)]``)."""
        return [
            torch.tensor([group.kappa_of(pos) for pos in range(len(group.params))], dtype=torch.float64)
            for group in self.groups
        ]


# ------------------------------------------------------------------------- the math


def _unscaled(grad: list[float], grad_scale: float | None) -> list[float]:
    return grad if grad_scale is None else [x / grad_scale for x in grad]


def _effective_grad(h: Hyper, param: list[float], grad: list[float], clip: float | None) -> list[float]:
    """Step 1: the (already unscaled) gradient, negated, clipped and with coupled decay."""
    out = []
    for p, g in zip(param, grad):
        if h.maximize:
            g = -g
        if clip is not None:
            g = clip * g
        if h.coupled_decay:
            g = g + h.weight_decay * p
        out.append(g)
    return out


def _prev_direction(h: Hyper, p: NaiveParam) -> list[float]:
    """``d_{t-1}`` from the state before this step's update (zero before the first step)."""
    if h.algorithm == "sgd":
        return list(p.buffer("momentum_buffer" if h.heavy_ball else "hypergrad_prev_direction"))
    if p.step == 0:
        return [0.0] * len(p.values)
    return _adam_direction(h, p.buffer("exp_avg"), _second_moment(h, p), p.step)


def _adam_direction(h: Hyper, m: list[float], v_hat: list[float], t: int) -> list[float]:
    """``(m / (1 - β1^t)) / (√v̂ / √(1 - β2^t) + ε)``, element by element."""
    beta1, beta2 = h.betas
    bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t
    return [(m_i / bias1) / (math.sqrt(v_i) / math.sqrt(bias2) + h.eps) for m_i, v_i in zip(m, v_hat)]


def _second_moment(h: Hyper, p: NaiveParam) -> list[float]:
    return p.buffer("max_exp_avg_sq") if h.amsgrad else p.buffer("exp_avg_sq")


def _adam_update(h: Hyper, p: NaiveParam, g: list[float], alpha: float) -> None:
    beta1, beta2 = h.betas
    m, v = p.buffer("exp_avg"), p.buffer("exp_avg_sq")
    v_max = p.buffer("max_exp_avg_sq") if h.amsgrad else None
    for i in range(len(p.values)):
        m[i] = beta1 * m[i] + (1.0 - beta1) * g[i]
        v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i]
        if v_max is not None:
            v_max[i] = max(v_max[i], v[i])
    direction = _adam_direction(h, m, _second_moment(h, p), p.step + 1)
    for i in range(len(p.values)):
        if h.decoupled and h.weight_decay != 0:
            p.values[i] = p.values[i] * (1.0 - alpha * h.weight_decay)
        p.values[i] = p.values[i] - alpha * direction[i]


def _sgd_update(h: Hyper, p: NaiveParam, g: list[float], alpha: float) -> None:
    direction = list(g)
    if h.momentum != 0:
        buf = p.buffer("momentum_buffer")
        w = 1.0 if p.step == 0 else 1.0 - h.dampening
        for i in range(len(buf)):
            buf[i] = h.momentum * buf[i] + w * g[i]
            direction[i] = g[i] + h.momentum * buf[i] if h.nesterov else buf[i]
    if h.adapts and not h.heavy_ball:
        p.state["hypergrad_prev_direction"] = list(direction)
    for i in range(len(p.values)):
        p.values[i] = p.values[i] - alpha * direction[i]


def _hypergrad_stats(g: list[float], d_prev: list[float]) -> tuple[float, float, float]:
    """``(Σ g·d_prev, Σ g², Σ d_prev²)`` of one parameter."""
    dot = gg = dd = 0.0
    for g_i, d_i in zip(g, d_prev):
        dot += g_i * d_i
        gg += g_i * g_i
        dd += d_i * d_i
    return dot, gg, dd


def _adapt(group: NaiveGroup, positions: list[int], stats: list[tuple[float, float, float]]) -> None:
    """Sum the statistics over each scope and update that scope's running mean and κ."""
    h = group.hyper
    if h.hypergrad_scope == "group":
        scoped = [(0, tuple(sum(column) for column in zip(*stats)))]
    else:
        scoped = list(zip(positions, stats))
    for scope, (dot, gg, dd) in scoped:
        if h.hypergrad == "mult":
            rho = h.hypergrad_norm_decay
            group.grad_sq_avg[scope] = rho * group.grad_sq_avg[scope] + (1.0 - rho) * gg
        group.kappa[scope] = _new_kappa(h, group.kappa[scope], group.grad_sq_avg[scope], dot, gg, dd)


def _new_kappa(h: Hyper, kappa: float, grad_sq_avg: float, dot: float, gg: float, dd: float) -> float:
    """The ``mult`` (with the running mean already updated) or ``add`` rule, clamped to
    ``[kappa_min, kappa_max]``."""
    if h.hypergrad == "mult":
        cosine = dot / (math.sqrt(max(gg, grad_sq_avg)) * math.sqrt(dd) + TINY)
        new = kappa * (1.0 + h.hypergrad_lr * min(max(cosine, -1.0), 1.0))
    elif h.lr == 0:
        return kappa
    else:
        new = kappa + h.hypergrad_lr * dot / h.lr
    return min(max(new, h.kappa_min), h.kappa_max)


def _global_norm(grads: list[list[float] | None]) -> float:
    total = 0.0
    for g in grads:
        for x in g or ():
            total += x * x
    return math.sqrt(total)


# ---------------------------------------------------------------------- plumbing


def _hyper(algorithm: str, options: dict[str, Any]) -> Hyper:
    """A group's :class:`Hyper` from alr's keyword names, with alr's defaults."""
    family = "sgd" if algorithm == "sgd" else "adam"
    hypergrad = options.get("hypergrad", "mult")
    default_weight_decay = 1e-2 if algorithm == "adamw" else 0.0
    default_hypergrad_lr = {"mult": 0.2, "add": 1e-7 if family == "adam" else 1e-3, "off": 0.0}[hypergrad]
    weight_decay = options.get("weight_decay")
    hypergrad_lr = options.get("hypergrad_lr")
    return Hyper(
        algorithm=family,
        lr=float(options["lr"]),
        weight_decay=default_weight_decay if weight_decay is None else float(weight_decay),
        decoupled=algorithm == "adamw",
        betas=tuple(float(b) for b in options.get("betas", (0.9, 0.999))),
        eps=float(options.get("eps", 1e-8)),
        amsgrad=bool(options.get("amsgrad", False)),
        momentum=float(options.get("momentum", 0.0)),
        dampening=float(options.get("dampening", 0.0)),
        nesterov=bool(options.get("nesterov", False)),
        maximize=bool(options.get("maximize", False)),
        hypergrad=hypergrad,
        hypergrad_lr=default_hypergrad_lr if hypergrad_lr is None else float(hypergrad_lr),
        hypergrad_norm_decay=float(options.get("hypergrad_norm_decay", 0.99)),
        hypergrad_scope=options.get("hypergrad_scope", "group"),
        hypergrad_exact=bool(options.get("hypergrad_exact", False)),
        kappa_min=float(options.get("kappa_min", 1e-3)),
        kappa_max=float(options.get("kappa_max", 1e5)),
    )


def _floats(t: Tensor) -> list[float]:
    return t.detach().double().flatten().tolist()


def _tensor(values: list[float], shape: tuple[int, ...]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(shape)
