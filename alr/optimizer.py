r"""ALROptimizer: a ``torch.optim.Optimizer`` for Adam, AdamW and SGD with a fused step.

The class owns the options (each algorithm's own are validated by its declaration in
:mod:`alr.algorithms`), κ and the telemetry, and the state-dict entry points. Lazy state is
:mod:`alr.state`, bucketing and the plan cache :mod:`alr.plan`, the checks of every tensor
:mod:`alr.validation`; the step itself is :func:`alr.functional.alr_step`, whose math is
stated in :mod:`alr.reference`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import backends
from .algorithms import GroupHyper, algorithm_of
from .distributed import StatsReduction, local_grads, sharded_reduction
from .functional import GroupWork, alr_step
from .plan import PlanCache, bucket_group
from .reference import STATS_DTYPE
from .state import check_loaded_state, restore_loaded_state

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ALROptimizer", "ALRStats"]

HYPERGRAD_MODES = ("mult", "add", "off")
HYPERGRAD_SCOPES = ("group", "tensor")

DEFAULT_HYPERGRAD_LR = {"mult": 0.2, "add": {"adam": 1e-7, "sgd": 1e-3}, "off": 0.0}
"""``mult``: 0.2, with ``hypergrad_norm_decay`` 0.99 and κ ∈ [1e-3, 1e5], chosen by the
convergence benchmark (``python -m bench.convergence``; the evidence is in the README): the
widest robust range of initial learning rates on all three tasks. ``add``: the paper's
values for Adam and SGD (they depend on the model's size and loss scale)."""

KAPPA_KEY = "hypergrad_kappa"
"""Param-group key of κ: a float32 tensor of shape [] (group scope) or [len(params)]."""

GRAD_SQ_AVG_KEY = "hypergrad_grad_sq_avg"
"""Param-group key of the ``mult`` rule's running mean of ‖g‖², shaped like κ."""

STATE_DTYPES = (torch.float32, torch.bfloat16)

STATE_DICT_KEY = "alr"
"""Top-level ``state_dict`` key of the optimizer-wide telemetry (ignored by torch.optim)."""


@dataclass(frozen=True)
class ALRStats:
    """Device tensors for logging; reading them is the only place a host sync may happen.

    Attributes:
        kappa: per param group, κ of each parameter (float32, shape ``[len(params)]``;
            all equal under ``hypergrad_scope="group"``).
        effective_lr: per param group, ``κ·lr`` of each parameter (same shapes).
        grad_norm: global L2 norm of the unscaled gradients at the last step that ran the
            statistics pre-pass (``max_grad_norm`` or ``skip_nonfinite``); NaN before.
            float32, or float64 when a gradient is float64 (the dtype it is computed in).
        skipped_steps: number of steps skipped for nonfinite gradients (int64).
    """

    kappa: list[Tensor]
    effective_lr: list[Tensor]
    grad_norm: Tensor
    skipped_steps: Tensor


class ALROptimizer(Optimizer):
    r"""Adam, AdamW or SGD with fused gradient statistics and an adaptive learning rate.

    The update is ``torch.optim``'s, with the effective learning rate :math:`\alpha = \kappa
    \cdot lr`: ``lr`` stays the param group's (schedulers keep working) and the multiplier
    :math:`\kappa` (starting at 1) is adapted online by hypergradient descent. Global
    gradient clipping, nonfinite-step skipping and GradScaler unscaling run inside the step.
    The full algorithm is the docstring of :mod:`alr.reference`.

    Args:
        params: iterable of parameters, named parameters or param-group dicts.
        lr: learning rate (float or 1-element tensor).
        algorithm: ``"adam"`` (coupled L2 decay), ``"adamw"`` (decoupled decay) or ``"sgd"``.
        betas, eps, amsgrad: Adam's (ignored by SGD).
        weight_decay: decay factor; default 1e-2 for ``adamw`` and 0 otherwise.
        momentum, dampening, nesterov: SGD's (ignored by Adam).
        maximize: maximise the objective instead of minimising it.
        hypergrad: ``"mult"`` (cosine-normalised multiplicative update of κ), ``"add"``
            (the paper's additive rule) or ``"off"`` (κ ≡ 1: exactly torch).
        hypergrad_lr: the hyper-learning-rate β; default 0.2 for ``mult``, and for ``add``
            the paper's 1e-7 (Adam) or 1e-3 (SGD).
        hypergrad_norm_decay: ρ, the decay of the running mean of ``‖g‖²`` that ``mult``
            divides by once the gradients fall below it, so that the adaptation fades
            when they vanish; 0 gives the plain cosine rule.
        hypergrad_scope: one κ per param ``"group"`` or per parameter ``"tensor"``.
        hypergrad_exact: adapt κ from a read-only pre-pass and use it in the same step
            (the paper's algorithm) instead of the one-pass default, whose statistics of
            step t adapt κ for step t + 1. Costs one more read of grads and state.
        kappa_min, kappa_max: bounds of κ.
        max_grad_norm: clip the global gradient norm (over every group) to this value,
            as ``torch.nn.utils.clip_grad_norm_`` would; None disables clipping.
        skip_nonfinite: skip the whole step (leaving everything bit-identical) when any
            gradient element is inf or nan. Like clipping, this needs a read-only pre-pass
            over the gradients (4 bytes per fp32 element, +14% traffic for AdamW).
        master_weights: keep a float32 copy of each 16-bit parameter in the state
            (``master_param``), update it, and write the parameter as its rounded image.
        stochastic_rounding: round bfloat16 parameters (without master weights)
            stochastically, from a counter-based stream keyed on (``rounding_seed``, the
            parameter's index, the step, the element): unbiased and reproducible.
        state_dtype: dtype of the moments / momentum buffer (float32 or bfloat16). None:
            float32 for 16-bit parameters with ``master_weights`` or
            ``stochastic_rounding`` (moments rounded to bfloat16 cannot decay by β2 = 0.999
            per step: measured +30% final loss on the digits MLP, see the README), else the
            parameter's dtype, as torch.optim.
        rounding_seed: the seed of the stochastic-rounding streams.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; the
            ``ALR_BACKEND`` environment variable replaces ``"auto"``.
        stats_group: the ranks over which the parameters are partitioned, each rank
            stepping a different subset of whole tensors (``ZeroRedundancyOptimizer``):
            the statistics are summed over it so that every rank clips, skips and adapts κ
            alike. Not needed for DDP (replicated) nor FSDP2 (DTensor shards: the groups
            come from their device mesh). ``"world"`` names the default group and, unlike a
            process group object, survives ZeroRedundancyOptimizer's state dict (ZeRO copies
            its keyword arguments into every param group). See :mod:`alr.distributed`.
        foreach, fused, capturable: accepted for compatibility with ``torch.optim``; alr
            always runs one fused multi-tensor implementation per (device, dtype) chosen by
            ``backend``, and its step is always capturable (device-resident scalars).
        differentiable: must be False: the fused step does not build an autograd graph.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        *,
        algorithm: str = "adamw",
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        hypergrad: str = "mult",
        hypergrad_lr: float | None = None,
        hypergrad_norm_decay: float = 0.99,
        hypergrad_scope: str = "group",
        hypergrad_exact: bool = False,
        kappa_min: float = 1e-3,
        kappa_max: float = 1e5,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = True,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | None = None,
        rounding_seed: int = 0,
        backend: str = "auto",
        stats_group: ProcessGroup | str | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        declaration = algorithm_of(algorithm)
        if weight_decay is None:
            weight_decay = 1e-2 if algorithm == "adamw" else 0.0
        if hypergrad_lr is None and hypergrad in HYPERGRAD_MODES:
            default = DEFAULT_HYPERGRAD_LR[hypergrad]
            hypergrad_lr = default[declaration.name] if isinstance(default, dict) else default
        _check_torch_flags(foreach=foreach, fused=fused, differentiable=differentiable)
        if max_grad_norm is not None and not 0 < max_grad_norm < math.inf:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        if isinstance(stats_group, str) and stats_group != "world":
            raise ValueError(f"Invalid stats_group: {stats_group!r}. Expected None, 'world' or a ProcessGroup")
        given = dict(betas=betas, eps=eps, amsgrad=amsgrad, decoupled_weight_decay=algorithm == "adamw",
                     momentum=momentum, dampening=dampening, nesterov=nesterov)  # fmt: skip
        declaration.check(lr, weight_decay, foreach=foreach, capturable=capturable, **given)
        defaults: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
        defaults.update({name: given[name] for name in declaration.hyper_parameters})
        if "betas" in defaults:
            defaults["betas"] = tuple(_to_float(b) for b in betas)
        defaults.update(
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            hypergrad=hypergrad,
            hypergrad_lr=hypergrad_lr,
            hypergrad_norm_decay=hypergrad_norm_decay,
            hypergrad_scope=hypergrad_scope,
            hypergrad_exact=hypergrad_exact,
            kappa_min=kappa_min,
            kappa_max=kappa_max,
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            state_dtype=state_dtype,
            rounding_seed=rounding_seed,
            backend=backend,
        )
        self.algorithm = declaration.name
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.stats_group = stats_group
        self._telemetry: dict[str, Tensor] | None = None
        self._plans = PlanCache()
        self._reduction_key: tuple | None = None
        self._reduction: StatsReduction | None = None
        super().__init__(params, defaults)
        # GradScaler hands its scale and found_inf to step() instead of unscaling separately.
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):
            # As torch does, but first: torch would only warn about duplicates.
            param_group["params"] = params = list(params)
            _check_distinct([p[1] if isinstance(p, tuple) else p for p in params])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group, self.algorithm)
        except Exception:
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            algorithm=self.algorithm,
            max_grad_norm=self.max_grad_norm,
            skip_nonfinite=self.skip_nonfinite,
            _telemetry=self._telemetry,
        )
        # A process group cannot be pickled or deep-copied: the copy runs on one process.
        state.pop("stats_group", None)
        state.pop("_reduction", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_telemetry", None)
        self.stats_group, self._reduction_key, self._reduction = None, None, None
        self._plans = PlanCache()
        self._step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step (no host synchronisation).

        Args:
            closure: re-evaluates the model and returns the loss; run with grad enabled.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reduction = self._stats_reduction()
        # Ranks meet in the statistics' collectives, so under a reduction every group takes
        # part, also where this rank has no gradient in it (a ZeRO share can be empty).
        keep_empty = reduction is not None
        started: list[Tensor] = []
        group_keys = [set(group) for group in self.param_groups]  # κ and a are created lazily too
        try:
            works = [
                work for index, group in enumerate(self.param_groups) if (work := self._group_work(index, keep_empty, started))
            ]
        except Exception:
            # A step that fails validation writes nothing: not even the state it started
            # lazily for the groups before the failing one.
            for p in started:
                self.state.pop(p, None)
            for group, keys in zip(self.param_groups, group_keys):
                for key in set(group) - keys:
                    del group[key]
            raise
        if not works:
            return loss
        # The norm is float64 when a gradient is (reference.grad_stats_dtype), else float32.
        float64 = any(bucket.dtype == torch.float64 for work in works for bucket in work.buckets)
        telemetry = self._telemetry_on(works[0].kappa.device, torch.float64 if float64 else torch.float32)
        alr_step(
            works,
            grad_norm=telemetry["grad_norm"],
            skipped_steps=telemetry["skipped_steps"],
            max_grad_norm=self.max_grad_norm,
            skip_nonfinite=self.skip_nonfinite,
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            reduction=reduction,
        )
        return loss

    def _stats_reduction(self) -> StatsReduction | None:
        """How this step's statistics become global (None on one process), found again
        only when the parameters change."""
        key = tuple(len(group["params"]) for group in self.param_groups)
        if key != self._reduction_key:
            if self.stats_group is not None:
                group = torch.distributed.group.WORLD if self.stats_group == "world" else self.stats_group
                self._reduction = StatsReduction((group,), per_tensor=False)
            else:
                self._reduction = sharded_reduction([p for group in self.param_groups for p in group["params"]])
            self._reduction_key = key
        return self._reduction

    def stats(self) -> ALRStats:
        """The adaptive scalars as device tensors (see :class:`ALRStats`)."""
        kappas, lrs = [], []
        for group in self.param_groups:
            kappa = self._kappa(group)
            kappa = kappa.expand(len(group["params"])) if kappa.dim() == 0 else kappa
            lr = group["lr"]
            lr = lr.to(kappa.device).reshape(()) if isinstance(lr, Tensor) else lr
            kappas.append(kappa.clone())
            lrs.append(kappa * lr)
        device = self.param_groups[0]["params"][0].device
        telemetry = self._telemetry or _new_telemetry(device)
        return ALRStats(kappas, lrs, telemetry["grad_norm"].clone(), telemetry["skipped_steps"].clone())

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            # ZeroRedundancyOptimizer copies its keyword arguments, stats_group included,
            # into every param group it hands over; a process group cannot be saved.
            group.pop("stats_group", None)
        if self._telemetry is not None:
            state_dict[STATE_DICT_KEY] = {k: v.clone() for k, v in self._telemetry.items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an alr or a ``torch.optim`` state dict (missing ALR state starts fresh)."""
        state_dict = dict(state_dict)
        telemetry = state_dict.pop(STATE_DICT_KEY, None)
        # Everything is checked before anything is replaced.
        device = self.param_groups[0]["params"][0].device
        if telemetry is not None:
            telemetry = _loaded_telemetry(telemetry, device)
        check_loaded_state(state_dict.get("state", {}), state_dict.get("param_groups", []), self.algorithm)
        super().load_state_dict(state_dict)
        self._plans.invalidate()
        for group in self.param_groups:
            for name, default in self.defaults.items():
                group.setdefault(name, default)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [(p, GroupHyper.from_group(g, self.algorithm)) for g in self.param_groups for p in g["params"]]
        restore_loaded_state(self.state, params, state_dict["state"], saved_ids)
        if telemetry is not None:
            self._telemetry = telemetry

    def _group_work(self, index: int, keep_empty: bool = False, started: list[Tensor] | None = None) -> GroupWork | None:
        """The share of this step of ``param_groups[index]``, from its cached plan while
        that holds (see :mod:`alr.plan`)."""
        group = self.param_groups[index]
        hyper = GroupHyper.from_group(group, self.algorithm)
        grads = local_grads(group["params"])
        build = lambda: bucket_group(
            group, index, hyper, self.state, lambda position: self._rounding_key(group, position), started
        )
        buckets = self._plans.buckets(group, hyper, grads, self.state, build)
        if not buckets and not keep_empty:
            return None
        grad_sq_avg = self._adaptive_scalar(group, GRAD_SQ_AVG_KEY, 0.0)
        return GroupWork(hyper, buckets, self._kappa(group), grad_sq_avg, group["backend"])

    def _rounding_key(self, group: dict[str, Any], position: int) -> int:
        """The stream key of ``group["params"][position]``: the group's rounding seed and the
        parameter's index in the optimizer (counted over the groups before it)."""
        offset = 0
        for other in self.param_groups:
            if other is group:
                break
            offset += len(other["params"])
        return (group["rounding_seed"] * 0x9E3779B1 + offset + position) & 0xFFFFFFFF

    def _kappa(self, group: dict[str, Any]) -> Tensor:
        """The group's κ, 1 at start."""
        return self._adaptive_scalar(group, KAPPA_KEY, 1.0)

    def _adaptive_scalar(self, group: dict[str, Any], key: str, initial: float) -> Tensor:
        """The group's adapted scalar ``key`` (one per scope), created at ``initial``; a
        transient ``initial`` when the adaptation is off (nothing is stored)."""
        device = next(p.device for g in [group, *self.param_groups] for p in g["params"])
        shape = () if group["hypergrad_scope"] == "group" else (len(group["params"]),)
        if group["hypergrad"] == "off":
            return torch.full(shape, initial, dtype=STATS_DTYPE, device=device)
        value = group.get(key)
        if not isinstance(value, Tensor) or value.shape != shape:
            value = torch.full(shape, initial, dtype=STATS_DTYPE, device=device)
        group[key] = value.to(device=device, dtype=STATS_DTYPE)
        return group[key]

    def _telemetry_on(self, device: torch.device, norm_dtype: torch.dtype) -> dict[str, Tensor]:
        if self._telemetry is None:
            self._telemetry = _new_telemetry(device)
        self._telemetry = {k: v.to(device) for k, v in self._telemetry.items()}
        self._telemetry["grad_norm"] = self._telemetry["grad_norm"].to(norm_dtype)
        return self._telemetry


def _new_telemetry(device: torch.device) -> dict[str, Tensor]:
    return {
        "grad_norm": torch.full((), math.nan, dtype=STATS_DTYPE, device=device),
        "skipped_steps": torch.zeros((), dtype=torch.int64, device=device),
    }


def _loaded_telemetry(entry: Any, device: torch.device) -> dict[str, Tensor]:
    """The state dict's ``alr`` entry as telemetry tensors on ``device``; raises, naming the
    entry, when it lacks a key or holds something other than one number per key."""
    fresh = _new_telemetry(device)
    if not isinstance(entry, dict) or set(entry) != set(fresh):
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"alr: the state dict's {STATE_DICT_KEY!r} entry must hold {sorted(fresh)}, got {keys}")
    loaded = {}
    for key, value in entry.items():
        if not isinstance(value, (Tensor, int, float)) or isinstance(value, bool) or torch.as_tensor(value).numel() != 1:
            raise ValueError(f"alr: the state dict's {STATE_DICT_KEY!r}[{key!r}] must be one number, got {value!r}")
        # A float64 grad norm (of float64 gradients) stays float64.
        dtype = torch.float64 if key == "grad_norm" and torch.as_tensor(value).dtype == torch.float64 else fresh[key].dtype
        loaded[key] = torch.as_tensor(value).to(device=device, dtype=dtype).reshape(())
    return loaded


def _check_group(group: dict[str, Any], algorithm: str) -> None:
    """Validate a param group's ALR options and its parameters' dtypes."""
    if group["hypergrad"] not in HYPERGRAD_MODES:
        raise ValueError(f"Invalid hypergrad: {group['hypergrad']!r}. Expected one of {list(HYPERGRAD_MODES)}")
    if group["hypergrad_scope"] not in HYPERGRAD_SCOPES:
        raise ValueError(
            f"Invalid hypergrad_scope: {group['hypergrad_scope']!r}. Expected one of {list(HYPERGRAD_SCOPES)}"
        )
    if not group["hypergrad_lr"] >= 0:
        raise ValueError(f"Invalid hypergrad_lr value: {group['hypergrad_lr']}")
    if not 0 <= group["hypergrad_norm_decay"] < 1:
        raise ValueError(f"Invalid hypergrad_norm_decay value: {group['hypergrad_norm_decay']}")
    if not 0 <= group["kappa_min"] <= group["kappa_max"]:
        raise ValueError(f"Invalid kappa bounds: [{group['kappa_min']}, {group['kappa_max']}]")
    if group["state_dtype"] is not None and group["state_dtype"] not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {group['state_dtype']}. Expected None, torch.float32 or torch.bfloat16")
    _check_finite(group, algorithm)
    backends.check_backend_name(group["backend"])
    if group["differentiable"]:
        raise RuntimeError("alr does not support differentiable=True: its fused step builds no autograd graph")
    if algorithm == "sgd" and group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    _check_distinct(group["params"])
    for p in group["params"]:
        if p.is_complex():
            raise TypeError(
                "alr does not support complex parameters; optimize torch.view_as_real(p) instead"
            )
        if not p.is_floating_point():
            raise TypeError(f"alr can only optimize floating-point tensors, but got {p.dtype}")
        if group["backend"] != "auto":
            backends.check_device(group["backend"], p.device, p.dtype)


ALR_FLOAT_OPTIONS = ("hypergrad_lr", "hypergrad_norm_decay", "kappa_min", "kappa_max")


def _check_finite(group: dict[str, Any], algorithm: str) -> None:
    """Every float hyper-parameter is finite: torch accepts ``momentum=nan`` or ``lr=inf``,
    which turn the parameters (and here κ) into NaN within a step or two."""
    names = ("lr", "weight_decay", *algorithm_of(algorithm).hyper_parameters, *ALR_FLOAT_OPTIONS)
    for name in names:
        value = group.get(name)
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"Invalid {name} value: {value}: alr takes finite hyper-parameters only")


def _check_distinct(params: list[Tensor]) -> None:
    """A param group lists each tensor once: twice, it would be stepped twice per step."""
    first: dict[int, int] = {}
    for position, p in enumerate(params):
        seen = first.setdefault(id(p), position)
        if seen != position:
            raise ValueError(
                f"alr: a param group lists the same tensor twice (params[{seen}] and params[{position}]); "
                "pass each parameter once"
            )


def _check_torch_flags(*, foreach: bool | None, fused: bool | None, differentiable: bool) -> None:
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def _to_float(x: float | Tensor) -> float:
    """Tensor betas and weight decay are read as Python floats (a host read on an accelerator)."""
    return float(x) if isinstance(x, Tensor) else x
