"""Hypothesis fuzz suite: torch parity of the drop-ins, backend parity, and bad inputs.

Four properties, each derandomized and without an example database (CI replays the same
examples), bounded so that the file runs in about 100 s on 2 CPU cores with
``TRITON_INTERPRET=1``:

1. ``alr.Adam``, ``alr.AdamW`` and ``alr.SGD`` against their ``torch.optim`` namesakes
   (every torch option: betas, eps, lr as a float or a tensor, weight decay, amsgrad,
   decoupled weight decay, maximize, momentum, dampening, nesterov) over 1-4 parameters
   (plain tensors of 1-3 dims and sides up to 6, vectors up to 200 elements, 0-size, 0-d,
   transposed ``Parameter(base.t())``, channels-last 4-d, non-dense slices) in float32 and
   float64 (torch's for-loop) or bfloat16 (torch's fused CPU step), in one or two param
   groups, for 1-5 steps of seeded gradients laid out like their parameter or contiguous;
   the parameters and every state tensor torch keeps are compared after every step.
2. Every native backend that runs here against ``backend="reference"``: the same layouts
   (vectors up to 3,000 elements) in float32, float64, bfloat16 and float16, the ALR
   options (hypergrad mode, scope and exactness, clipping, nonfinite skipping with an inf or
   nan gradient on one step, ``state_dtype``, master weights for 16-bit and stochastic
   rounding for bfloat16 parameters), 2-4 steps; parameters, every state tensor and
   ``stats()`` compared after every step, and a skipped step must change no bit.
3. Bad inputs after 1-3 good steps of 2-3 param groups of 1-2 parameters (some of which
   get their first gradient, or none, at the bad step): a gradient of another dtype or
   shape (through ``p.grad.data``); a state tensor replaced by hand by one of another
   dtype, of another shape, expanded (overlapping memory) or on the meta device; a step
   counter of another dtype; a parameter resized or cast through ``p.data``; a checkpoint
   with a short state tensor, a negative or nonfinite step, or another algorithm's state;
   and a nonfinite gradient under ``skip_nonfinite``. Each must raise a RuntimeError,
   ValueError or TypeError naming the parameter (``params[i] of param group g``) while
   every other parameter, all their state and every param-group tensor keep their bits (a
   step is atomic: an error in a later group leaves the earlier ones unstepped, and no state
   is created), or, for the nonfinite gradient, skip the step with every bit kept. The
   corruptions that a native kernel would turn into out-of-bounds memory accesses run on
   the reference backend here, the others on every backend;
4. those run on the ``cpu`` (vectors up to 20,000 elements) and ``triton`` (2,048)
   backends, in one child process per backend, so that a segfault or an abort fails the
   test instead of killing the run.

All comparisons use ``helpers.tolerances`` (through ``assert_optimizer_state_close`` and
``parity.assert_kappa_close``) or bit identity.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from torch import Tensor

import alr
from alr import backends as alr_backends
from helpers import assert_bit_identical, assert_optimizer_state_close, snapshot
from parity import assert_kappa_close, set_same_grads


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


DROPIN_EXAMPLES = 600
BACKEND_EXAMPLES = 150
CORRUPTION_EXAMPLES = 300
CHILD_EXAMPLES = {"cpu": 80, "triton": 40}
CHILD_LONG = {"cpu": 20_000, "triton": 2048}
"""The longest vector of a child's cases (the Triton interpreter's good steps cost by size)."""
CHILD_TIMEOUT_S = 120

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
BAD_VALUES = (math.inf, -math.inf, math.nan)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread (the reference runs many tiny ops, which crawl on shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@cache
def runnable_backends() -> tuple[tuple[str, torch.device], ...]:
    """Every backend that can run here, with its device (as conftest's ``any_backend``)."""
    found = []
    for name in alr_backends.BACKENDS:
        if alr_backends.backend_unavailable_reason(name) is not None:
            continue
        if name in ("reference", "cpu"):
            found.append((name, torch.device("cpu")))
        elif torch.cuda.is_available():
            found.append((name, torch.device("cuda")))
        elif name == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            found.append((name, torch.device("cpu")))
    return tuple(found)


def _takes(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    try:
        alr_backends.check_device(backend, device, dtype)
    except ValueError:
        return False
    return True


# --- parameters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How one parameter is laid out, and its shape."""

    layout: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def make(self, dtype: torch.dtype, generator: torch.Generator, device: torch.device) -> Tensor:
        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

        if self.layout == "transposed":
            data = randn(*reversed(self.shape)).t()
        elif self.layout == "channels_last":
            data = randn(*self.shape).contiguous(memory_format=torch.channels_last)
        elif self.layout == "sliced":
            data = randn(self.shape[0], 2 * self.shape[1])[:, ::2]
        else:
            data = randn(*self.shape)
        return torch.nn.Parameter(data)


def make_params(specs: tuple[Spec, ...], dtype: torch.dtype, seed: int, device: torch.device) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [spec.make(dtype, generator, device) for spec in specs]


@st.composite
def specs(draw, long: int, side: int = 6, dense: bool = False) -> Spec:
    """A parameter layout: plain (1-3 dims), a vector of up to ``long`` elements, 0-size,
    0-d, transposed, channels-last 4-d, or (unless ``dense``) a non-dense slice."""
    layouts = ["plain", "long", "empty", "scalar", "transposed", "channels_last", *([] if dense else ["sliced"])]
    layout = draw(st.sampled_from(layouts))
    sides = st.integers(1, side)
    if layout == "plain":
        shape = tuple(draw(st.lists(sides, min_size=1, max_size=3)))
    elif layout == "long":
        shape = (draw(st.integers(side, long)),)
    elif layout == "empty":
        shape = draw(st.sampled_from([(0,), (3, 0), (0, 2, 1)]))
    elif layout == "scalar":
        shape = ()
    elif layout == "channels_last":
        shape = (draw(st.integers(1, 2)), draw(st.integers(2, side)), draw(st.integers(2, 3)), draw(st.integers(1, 3)))
    else:
        shape = (draw(st.integers(2, side)), draw(st.integers(2, side)))
    return Spec(layout, shape)


# --- options --------------------------------------------------------------------------------


@st.composite
def adam_options(draw) -> dict:
    return dict(
        betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.9999))),
        eps=draw(st.sampled_from([1e-8]) | st.floats(1e-8, 1e-3)),
        amsgrad=draw(st.booleans()),
    )


@st.composite
def sgd_options(draw) -> dict:
    momentum = draw(st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.95))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov or momentum == 0 else draw(st.sampled_from([0.0]) | st.floats(0.0, 0.9))
    return dict(momentum=momentum, dampening=dampening, nesterov=nesterov)


def learning_rates(algorithm: str) -> st.SearchStrategy[float]:
    return st.floats(1e-3, 3e-2) if algorithm != "sgd" else st.floats(1e-3, 0.2)


weight_decays = st.sampled_from([0.0]) | st.floats(0.0, 0.2)


@st.composite
def hypergrad_options(draw, algorithm: str) -> dict:
    mode = draw(st.sampled_from(["mult", "add", "off"]))
    if mode == "off":
        return dict(hypergrad="off")
    add_lr = 1e-4 if algorithm != "sgd" else 1e-3
    return dict(
        hypergrad=mode,
        hypergrad_lr=draw(st.floats(0.0, 0.3) if mode == "mult" else st.floats(0.0, add_lr)),
        hypergrad_norm_decay=draw(st.sampled_from([0.0, 0.99]) | st.floats(0.0, 0.999)),
        hypergrad_scope=draw(st.sampled_from(["group", "tensor"])),
        hypergrad_exact=draw(st.booleans()),
        kappa_min=draw(st.sampled_from([1e-3]) | st.floats(1e-3, 1.0)),
        kappa_max=draw(st.sampled_from([1e5]) | st.floats(1.0, 100.0)),
    )


def split_groups(params: list[Tensor], split: int, second: dict) -> list[dict] | list[Tensor]:
    """One group, or two when ``0 < split < len(params)`` (the second with ``second``)."""
    if not 0 < split < len(params):
        return params
    return [{"params": params[:split]}, {"params": params[split:], **second}]


# --- 1. drop-ins against torch.optim --------------------------------------------------------

TORCH_IMPL = {torch.float32: {"foreach": False}, torch.float64: {"foreach": False}, torch.bfloat16: {"fused": True}}
"""The torch step each dtype is compared with (16-bit: the fused CPU step, which computes
in float32 as alr does)."""

FUSED_SGD_SCALAR_TAIL = 16
"""torch's fused CPU SGD with momentum is a valid bfloat16 reference only on tensors shorter
than this (see tests/test_dropin_parity.py)."""


@dataclass(frozen=True)
class DropinCase:
    name: str
    dtype: torch.dtype
    specs: tuple[Spec, ...]
    options: dict
    lr: float
    tensor_lr: bool
    split: int
    second: dict
    seed: int
    grad_like_param: bool
    without_grad: tuple[tuple[int, ...], ...]
    """Per step, the parameters that have no gradient."""

    def build(self, cls: type, params: list[Tensor], **impl) -> torch.optim.Optimizer:
        as_lr = (lambda v: torch.tensor(v)) if self.tensor_lr else (lambda v: v)
        second = {k: as_lr(v) if k == "lr" else v for k, v in self.second.items()}
        return cls(split_groups(params, self.split, second), lr=as_lr(self.lr), **self.options, **impl)


@st.composite
def dropin_cases(draw) -> DropinCase:
    name = draw(st.sampled_from(["Adam", "AdamW", "SGD"]))
    dtype = draw(st.sampled_from(list(TORCH_IMPL)))
    options = draw(sgd_options() if name == "SGD" else adam_options())
    if name == "Adam":
        options["decoupled_weight_decay"] = draw(st.booleans())
    options.update(weight_decay=draw(weight_decays), maximize=draw(st.booleans()))
    # torch's fused CPU kernels (the 16-bit reference) assume a gradient laid out like its
    # parameter: they read a row-major gradient of a transposed parameter transposed, and
    # step a non-dense parameter wrongly.
    fused = "fused" in TORCH_IMPL[dtype]
    spec = specs(long=200, dense=fused)
    if fused and options.get("momentum"):
        spec = specs(long=FUSED_SGD_SCALAR_TAIL - 1, side=3, dense=True).filter(lambda s: s.numel < FUSED_SGD_SCALAR_TAIL)
    param_specs = tuple(draw(st.lists(spec, min_size=1, max_size=4)))
    algorithm = "sgd" if name == "SGD" else "adam"
    without_grad = [
        tuple(i for i in range(len(param_specs)) if draw(st.integers(0, 3)) == 0) for _ in range(draw(st.integers(1, 5)))
    ]
    if fused and options.get("momentum"):
        without_grad[0] = ()  # torch's fused SGD cannot start a momentum buffer once others exist
    return DropinCase(
        name=name,
        dtype=dtype,
        specs=param_specs,
        options=options,
        lr=draw(learning_rates(algorithm)),
        tensor_lr=draw(st.booleans()),
        split=draw(st.integers(0, len(param_specs) - 1)),
        second=dict(lr=draw(learning_rates(algorithm)), weight_decay=draw(weight_decays)),
        seed=draw(st.integers(0, 2**16)),
        grad_like_param=fused or draw(st.booleans()),
        without_grad=tuple(without_grad),
    )


@_settings(DROPIN_EXAMPLES)
@given(case=dropin_cases())
def test_dropins_match_torch(case: DropinCase) -> None:
    """Each step of a drop-in equals its torch.optim namesake's, parameters and state."""
    cpu = torch.device("cpu")
    ps, qs = (make_params(case.specs, case.dtype, case.seed, cpu) for _ in range(2))
    opt = case.build(getattr(alr, case.name), ps)
    ref = case.build(getattr(torch.optim, case.name), qs, **TORCH_IMPL[case.dtype])
    for step, without_grad in enumerate(case.without_grad):
        note(f"step {step + 1}")
        set_same_grads([ps, qs], seed=case.seed + step, like_param=case.grad_like_param)
        for i in without_grad:
            ps[i].grad = qs[i].grad = None
        opt.step()
        ref.step()
        assert_optimizer_state_close(opt, ps, ref, qs)


# --- 2. every backend against the reference -------------------------------------------------


@dataclass(frozen=True)
class BackendCase:
    dtype: torch.dtype
    specs: tuple[Spec, ...]
    options: dict
    split: int
    second: dict
    steps: int
    seed: int
    grad_like_param: bool
    poison: tuple[int, int, float] | None
    """(step, parameter, value): one gradient element of that step made inf or nan."""


@st.composite
def alr_options(draw, dtype: torch.dtype) -> dict:
    algorithm = draw(st.sampled_from(["adam", "adamw", "sgd"]))
    options = dict(algorithm=algorithm, **draw(sgd_options() if algorithm == "sgd" else adam_options()))
    options.update(
        lr=draw(learning_rates(algorithm)),
        weight_decay=draw(weight_decays),
        maximize=draw(st.booleans()),
        max_grad_norm=draw(st.none() | st.floats(0.1, 10.0)),
        skip_nonfinite=draw(st.booleans()),
        state_dtype=draw(st.sampled_from([None, torch.float32, torch.bfloat16])),
        **draw(hypergrad_options(algorithm)),
    )
    writes = ["nearest", "master"] if dtype in SIXTEEN_BIT else ["nearest"]
    if dtype == torch.bfloat16:
        writes.append("stochastic")
    write = draw(st.sampled_from(writes))
    options.update(master_weights=write == "master", stochastic_rounding=write == "stochastic")
    if write == "stochastic":
        options["rounding_seed"] = draw(st.integers(0, 2**31))
    return options


@st.composite
def backend_cases(draw) -> BackendCase:
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    options = draw(alr_options(dtype))
    param_specs = tuple(draw(st.lists(specs(long=3000), min_size=1, max_size=4)))
    steps = draw(st.integers(2, 4))
    poison = None
    nonempty = [i for i, s in enumerate(param_specs) if s.numel]
    if options["skip_nonfinite"] and nonempty and draw(st.booleans()):
        poison = (draw(st.integers(0, steps - 1)), draw(st.sampled_from(nonempty)), draw(st.sampled_from(BAD_VALUES)))
    return BackendCase(
        dtype=dtype,
        specs=param_specs,
        options=options,
        split=draw(st.integers(0, len(param_specs) - 1)),
        second=dict(lr=draw(learning_rates(options["algorithm"])), weight_decay=draw(weight_decays)),
        steps=steps,
        seed=draw(st.integers(0, 2**16)),
        grad_like_param=draw(st.booleans()),
        poison=poison,
    )


@_settings(BACKEND_EXAMPLES)
@given(case=backend_cases())
def test_backends_match_the_reference(case: BackendCase) -> None:
    """Every native backend that takes the dtype follows the reference at every step."""
    natives = [(n, d) for n, d in runnable_backends() if n != "reference" and _takes(n, d, case.dtype)]

    def build(backend: str, device: torch.device) -> tuple[list[Tensor], alr.ALROptimizer]:
        params = make_params(case.specs, case.dtype, case.seed, device)
        return params, alr.ALROptimizer(split_groups(params, case.split, case.second), backend=backend, **case.options)

    references = {device: build("reference", device) for _, device in natives}
    runs = [(name, *build(name, device), *references[device]) for name, device in natives]
    for step in range(case.steps):
        note(f"step {step + 1}")
        poison = case.poison[1:] if case.poison and case.poison[0] == step else None
        sets = [run[1] for run in runs] + [ps for ps, _ in references.values()]
        set_same_grads(sets, seed=case.seed + step, like_param=case.grad_like_param, poison=poison)
        before = [snapshot(opt, ps) if poison else None for _, ps, opt, _, _ in runs]
        for _, ps, opt, _, _ in runs:
            opt.step()
        for _, ref in references.values():
            ref.step()
        for (name, ps, opt, qs, ref), old in zip(runs, before):
            note(f"backend {name}")
            assert_optimizer_state_close(opt, ps, ref, qs)
            assert_kappa_close(opt, ref)
            if poison is not None:
                for index, (a, b) in enumerate(zip(snapshot(opt, ps), old)):
                    assert_bit_identical(a, b, f"{name}: tensor {index} changed by a skipped step")


# --- 3. bad inputs leave everything bit-identical -------------------------------------------


@dataclass(frozen=True)
class Corruption:
    """A bad input made after some good steps, and whether a native kernel would turn it
    into an out-of-bounds memory access if validation let it through."""

    apply: Callable[[alr.ALROptimizer, Tensor, int, CorruptionCase], Callable[[], None]]
    """``(opt, target, flat index, case) -> trigger``: corrupts, and returns what must raise."""
    memory_sensitive: bool
    raises: bool = True
    keeps_param: bool = True
    """Whether the target parameter's value itself must stay as it was."""


def _pick(options: list, case: CorruptionCase):
    assume(options)
    return options[case.choice % len(options)]


def _elementwise_keys(entry: dict, p: Tensor) -> list[str]:
    return sorted(k for k, v in entry.items() if isinstance(v, Tensor) and v.shape == p.shape and k != "step")


def _other_dtype(dtype: torch.dtype, case: CorruptionCase, widest_first: bool = False) -> torch.dtype:
    """Another floating dtype; the narrowest first (what a kernel would read past the end of),
    or the widest (what it would read and write the narrower state as)."""
    order = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return _pick([d for d in (order[::-1] if widest_first else order) if d != dtype], case)


def _wrong_shape(p: Tensor, case: CorruptionCase) -> tuple[int, ...]:
    """A 1-element vector or a longer one, never ``p``'s shape."""
    n = 1 if case.choice % 2 else p.numel() + 3
    return (n + 1,) if (n,) == tuple(p.shape) else (n,)


def _replace_state(make: Callable[[Tensor, Tensor, CorruptionCase], Tensor]):
    """Replaces, by hand, one of the target's state tensors shaped like it by ``make(old, p, case)``."""

    def apply(opt, p, index, case):
        key = _pick(_elementwise_keys(opt.state[p], p), case)
        opt.state[p][key] = make(opt.state[p][key], p, case)
        return opt.step

    return apply


def _expanded(old: Tensor, p: Tensor, case: CorruptionCase) -> Tensor:
    assume(p.numel() > 1)
    return torch.zeros(1, dtype=old.dtype, device=p.device).expand(p.shape)


def _grad_of_other_dtype(opt, p, index, case):
    p.grad.data = p.grad.data.to(_other_dtype(p.dtype, case))
    return opt.step


def _grad_of_other_shape(opt, p, index, case):
    p.grad.data = torch.ones(_wrong_shape(p, case), dtype=p.dtype, device=p.device)
    return opt.step


def _step_of_other_dtype(opt, p, index, case):
    opt.state[p]["step"] = opt.state[p]["step"].to(torch.float64 if case.choice % 2 else torch.int64)
    return opt.step


def _resized(opt, p, index, case):
    """``p.data`` replaced by a shorter or a longer vector, with a gradient of its shape."""
    n = p.numel() // 2 if case.choice % 2 and p.numel() > 1 else p.numel() + 1 + case.choice % 64
    p.data = torch.zeros(n, dtype=p.dtype, device=p.device)
    p.grad = torch.ones_like(p)
    return opt.step


def _cast(opt, p, index, case):
    """``p.data`` cast to another dtype (the state keeps the old one), with a gradient of it."""
    assume(not case.options["master_weights"])
    p.data = p.data.to(_other_dtype(p.dtype, case, widest_first=True))
    p.grad = torch.ones_like(p)
    return opt.step


def _nonfinite_grad(opt, p, index, case):
    assume(p.numel())
    element = torch.arange(p.numel(), device=p.device).view(p.shape) == case.choice % p.numel()
    p.grad.masked_fill_(element, BAD_VALUES[case.choice % 3])
    return opt.step


def _checkpoint(edit: Callable[[dict, Tensor, CorruptionCase], None]):
    """A corruption of the target's entry in a saved state dict (deep-copied, as a checkpoint
    read back is: ``state_dict()`` shares its per-parameter dicts with the optimizer), then
    loaded and stepped: either may raise."""

    def apply(opt, p, index, case):
        saved = copy.deepcopy(opt.state_dict())
        edit(saved["state"][index], p, case)

        def trigger() -> None:
            opt.load_state_dict(saved)
            opt.step()

        return trigger

    return apply


def _short_saved_state(entry: dict, p: Tensor, case: CorruptionCase) -> None:
    key = _pick(_elementwise_keys(entry, p), case)
    entry[key] = torch.zeros(_wrong_shape(p, case), dtype=entry[key].dtype)


def _bad_saved_step(entry: dict, p: Tensor, case: CorruptionCase) -> None:
    entry["step"] = torch.tensor([-1.0, math.nan, math.inf][case.choice % 3])


def _foreign_saved_state(entry: dict, p: Tensor, case: CorruptionCase) -> None:
    """A state key of the other algorithm (a checkpoint of another optimizer)."""
    entry["momentum_buffer" if case.options["algorithm"] != "sgd" else "exp_avg"] = torch.zeros_like(p)


CORRUPTIONS = {
    "grad_of_other_dtype": Corruption(_grad_of_other_dtype, memory_sensitive=True),
    "grad_of_other_shape": Corruption(_grad_of_other_shape, memory_sensitive=True),
    "state_of_other_dtype": Corruption(
        _replace_state(lambda old, p, case: old.to(_other_dtype(old.dtype, case))), memory_sensitive=True
    ),
    "state_of_other_shape": Corruption(
        _replace_state(lambda old, p, case: torch.zeros(_wrong_shape(p, case), dtype=old.dtype, device=p.device)),
        memory_sensitive=True,
    ),
    "state_expanded": Corruption(_replace_state(_expanded), memory_sensitive=True),
    "state_on_meta": Corruption(_replace_state(lambda old, p, case: old.to("meta")), memory_sensitive=True),
    "step_of_other_dtype": Corruption(_step_of_other_dtype, memory_sensitive=False),
    "resized_param": Corruption(_resized, memory_sensitive=True, keeps_param=False),
    "cast_param": Corruption(_cast, memory_sensitive=True, keeps_param=False),
    "checkpoint_short_state": Corruption(_checkpoint(_short_saved_state), memory_sensitive=True),
    "checkpoint_bad_step": Corruption(_checkpoint(_bad_saved_step), memory_sensitive=False),
    "checkpoint_foreign_state": Corruption(_checkpoint(_foreign_saved_state), memory_sensitive=False),
    "nonfinite_grad": Corruption(_nonfinite_grad, memory_sensitive=False, raises=False),
}
MEMORY_SENSITIVE = tuple(name for name, c in CORRUPTIONS.items() if c.memory_sensitive)

every_backend = st.deferred(lambda: st.sampled_from([name for name, _ in runnable_backends()]))


@dataclass(frozen=True)
class CorruptionCase:
    backend: str
    corruption: str
    dtype: torch.dtype
    groups: tuple[tuple[Spec, ...], ...]
    grads: tuple[str, ...]
    """Per parameter (flat): "always" a gradient, only at the bad step ("late": its state is
    created by it), or none at the bad step ("idle")."""
    target: tuple[int, int]
    """(param group, position) of the corrupted parameter."""
    choice: int
    """Picks the corruption's details (which state key, which dtype or shape)."""
    options: dict
    good_steps: int
    seed: int


@st.composite
def corruption_cases(
    draw, corruptions: tuple[str, ...], backends: st.SearchStrategy[str], sensitive_backends: st.SearchStrategy[str], long: int
) -> CorruptionCase:
    """A corruption, on a backend of ``backends`` (``sensitive_backends`` for a memory-sensitive
    one), of one parameter of 2-3 param groups of 1-2 parameters."""
    corruption = draw(st.sampled_from(corruptions))
    backend = draw(sensitive_backends if CORRUPTIONS[corruption].memory_sensitive else backends)
    device = dict(runnable_backends())[backend]
    dtype = draw(st.sampled_from([d for d in (torch.float32, torch.float64, torch.bfloat16) if _takes(backend, device, d)]))
    groups = tuple(tuple(draw(st.lists(specs(long=long), min_size=1, max_size=2))) for _ in range(draw(st.integers(2, 3))))
    group = draw(st.integers(0, len(groups) - 1))
    position = draw(st.integers(0, len(groups[group]) - 1))
    # A skipped step creates the state of a parameter stepped for the first time (as torch's
    # fused optimizers do), so there every parameter with a gradient has state already.
    patterns = ["always", "idle"] if corruption == "nonfinite_grad" else ["always", "late", "idle"]
    grads = [draw(st.sampled_from(patterns)) for specs_of_group in groups for _ in specs_of_group]
    grads[sum(map(len, groups[:group])) + position] = "always"
    algorithm = draw(st.sampled_from(["adam", "adamw", "sgd"]))
    options = dict(algorithm=algorithm, lr=draw(learning_rates(algorithm)))
    options.update(draw(adam_options()) if algorithm != "sgd" else dict(momentum=0.9))
    options.update(
        hypergrad=draw(st.sampled_from(["mult", "off"])),
        hypergrad_scope=draw(st.sampled_from(["group", "tensor"])),
        max_grad_norm=draw(st.none() | st.just(1.0)),
        skip_nonfinite=corruption == "nonfinite_grad" or draw(st.booleans()),
        master_weights=dtype in SIXTEEN_BIT and draw(st.booleans()),
    )
    return CorruptionCase(
        backend=backend,
        corruption=corruption,
        dtype=dtype,
        groups=groups,
        grads=tuple(grads),
        target=(group, position),
        choice=draw(st.integers(0, 2**10)),
        options=options,
        good_steps=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


def check_corruption(case: CorruptionCase) -> None:
    """Steps well, corrupts one parameter, and checks that nothing is written anywhere."""
    device = dict(runnable_backends())[case.backend]
    flat = make_params(tuple(s for group in case.groups for s in group), case.dtype, case.seed, device)
    sizes = [len(group) for group in case.groups]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    opt = alr.ALROptimizer(
        [{"params": flat[start : start + size]} for start, size in zip(starts, sizes)], backend=case.backend, **case.options
    )
    for step in range(case.good_steps + 1):
        bad_step = step == case.good_steps
        set_same_grads([flat], seed=case.seed + step)
        for p, pattern in zip(flat, case.grads):
            if pattern == ("idle" if bad_step else "late"):
                p.grad = None
        if not bad_step:
            opt.step()
    group, position = case.target
    index = starts[group] + position
    target = flat[index]
    corruption = CORRUPTIONS[case.corruption]
    # What must keep its bits: the other parameters and their state (none for a "late" one),
    # every group's tensors (κ), and the target's value where the corruption keeps it (all
    # of it when the step is skipped).
    watched = [p for p in flat if p is not target] if corruption.raises else flat

    def kept() -> list[Tensor]:
        return snapshot(opt, watched) + ([target.detach().clone()] if corruption.keeps_param else [])

    before = kept()
    skipped = None if corruption.raises else int(opt.stats().skipped_steps)
    trigger = corruption.apply(opt, target, index, case)
    if corruption.raises:
        with pytest.raises((RuntimeError, ValueError, TypeError)) as raised:
            trigger()
        name = f"params[{position}] of param group {group}"
        assert name in str(raised.value), f"the error does not name {name}: {raised.value!r}"
    else:
        trigger()
        assert int(opt.stats().skipped_steps) == skipped + 1
    after = kept()
    assert len(after) == len(before), "state was created or removed"
    for i, (a, b) in enumerate(zip(after, before)):
        assert_bit_identical(a, b, f"tensor {i} changed")


@_settings(CORRUPTION_EXAMPLES)
@given(case=corruption_cases(tuple(CORRUPTIONS), every_backend, st.just("reference"), long=64))
def test_bad_inputs_write_nothing(case: CorruptionCase) -> None:
    """A bad input raises naming the parameter, having written nothing in any group; a
    nonfinite gradient under skip_nonfinite skips the step bit-identically."""
    check_corruption(case)


# --- 4. memory-sensitive corruptions on the native backends, in a child process -------------


def fuzz_native_corruptions(backend: str, examples: int) -> None:
    """Property 3's check for the memory-sensitive corruptions on ``backend``, with vectors
    of up to ``CHILD_LONG[backend]`` elements (run by the child process of the test below)."""
    torch.set_num_threads(1)

    @_settings(examples)
    @given(case=corruption_cases(MEMORY_SENSITIVE, st.just(backend), st.just(backend), long=CHILD_LONG[backend]))
    def run(case: CorruptionCase) -> None:
        check_corruption(case)

    run()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_native_backends_survive_memory_sensitive_corruptions(backend: str) -> None:
    """A child process runs the corruptions: a segfault or an abort fails this test."""
    if backend not in dict(runnable_backends()):
        pytest.skip(f"the {backend} backend cannot run here")
    folder, module = os.path.split(os.path.splitext(os.path.abspath(__file__))[0])
    code = (
        f"import sys; sys.path.insert(0, {folder!r}); import {module}; "
        f"{module}.fuzz_native_corruptions({backend!r}, {CHILD_EXAMPLES[backend]}); print('done')"
    )
    try:
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"the child process ran past {CHILD_TIMEOUT_S} s:\n{timeout.stdout}{timeout.stderr}")
    output = (child.stdout + child.stderr)[-6000:]
    assert child.returncode >= 0, f"the child process was killed by signal {-child.returncode}:\n{output}"
    assert child.returncode == 0 and "done" in child.stdout, f"the child process failed:\n{output}"
