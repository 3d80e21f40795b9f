"""Property tests: random shapes, dtypes and hyper-parameters against the naive model.

Hypothesis draws a configuration (algorithm, parameter shapes of 0-3 dims with sizes 0-9,
float32 or float64, every hyper-parameter of the step and of the κ adaptation) and runs
3-8 steps of :class:`alr.ALROptimizer` (``backend="reference"``) and of
:class:`naive.NaiveALR` on the same gradients. A second property checks that a step with a
nonfinite gradient never changes anything. Runs are derandomized, so CI is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

import alr
from helpers import assert_bit_identical, clone_params, snapshot, tolerances
from naive import NaiveALR

SETTINGS = settings(
    max_examples=250, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
"""About 4 s for both properties on 2 CPU cores."""


@dataclass
class Case:
    """One drawn configuration: parameters, optimizer options, and the gradients of each step."""

    params: list[Tensor]
    options: dict
    grads: list[list[Tensor | None]] = field(default_factory=list)

    def __repr__(self) -> str:
        params = [(tuple(p.shape), str(p.dtype).removeprefix("torch.")) for p in self.params]
        return f"Case(params={params}, steps={len(self.grads)}, options={self.options})"


shapes = st.lists(st.integers(0, 9), max_size=3).map(tuple)


@st.composite
def adam_options(draw) -> dict:
    return dict(
        algorithm=draw(st.sampled_from(["adam", "adamw"])),
        betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.9999))),
        eps=draw(st.floats(1e-8, 1e-3)),
        amsgrad=draw(st.booleans()),
    )


@st.composite
def sgd_options(draw) -> dict:
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]) | st.floats(0.0, 0.95))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.sampled_from([0.0]) | st.floats(0.0, 0.9))
    return dict(algorithm="sgd", momentum=momentum, dampening=dampening, nesterov=nesterov)


@st.composite
def hypergrad_options(draw) -> dict:
    mode = draw(st.sampled_from(["mult", "add", "off"]))
    options = dict(hypergrad=mode)
    if mode == "off":
        return options
    return dict(
        options,
        hypergrad_lr=draw(st.floats(0.0, 0.5) if mode == "mult" else st.floats(0.0, 1e-3)),
        hypergrad_norm_decay=draw(st.sampled_from([0.0, 0.99]) | st.floats(0.0, 0.999)),
        hypergrad_scope=draw(st.sampled_from(["group", "tensor"])),
        hypergrad_exact=draw(st.booleans()),
        kappa_min=draw(st.floats(1e-3, 1.0)),
        kappa_max=draw(st.floats(1.0, 100.0)),
    )


@st.composite
def cases(draw) -> Case:
    """A random configuration with 3-8 steps of seeded gradients.

    All parameters are float32, all float64, or each draws its dtype (one group then holds
    two buckets). The first parameter gets a gradient at every step, the others at random.
    """
    dtype = draw(st.sampled_from([torch.float32, torch.float64, None]))
    param_shapes = draw(st.lists(shapes, min_size=1, max_size=3))
    dtypes = [dtype or draw(st.sampled_from([torch.float32, torch.float64])) for _ in param_shapes]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    params = [torch.randn(s, generator=generator, dtype=d).requires_grad_() for s, d in zip(param_shapes, dtypes)]
    options = dict(
        draw(adam_options() | sgd_options()),
        lr=draw(st.floats(1e-4, 1.0)),
        weight_decay=draw(st.sampled_from([0.0]) | st.floats(0.0, 0.1)),
        maximize=draw(st.booleans()),
        max_grad_norm=draw(st.none() | st.floats(0.1, 10.0)),
        **draw(hypergrad_options()),
    )
    case = Case(params, options)
    for _ in range(draw(st.integers(3, 8))):
        has_grad = [index == 0 or draw(st.booleans()) for index in range(len(params))]
        case.grads.append(
            [torch.randn(p.shape, generator=generator, dtype=p.dtype) if has else None
             for p, has in zip(params, has_grad)]
        )
    return case


def _assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, msg: str) -> None:
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def _trajectory_dtype(param: Tensor, options: dict) -> torch.dtype:
    """The precision a parameter's trajectory is specified to.

    κ and the clip coefficient are float32 by the spec and scale every update, so a float64
    parameter is only float32-accurate once either is in play.
    """
    scaled = options["hypergrad"] != "off" or options["max_grad_norm"] is not None
    return torch.float32 if scaled else param.dtype


def _assert_matches_naive(opt, params, naive: NaiveALR, options: dict, label: str) -> None:
    """Parameters, every state entry the spec defines and κ agree with the naive model."""
    for index, (actual, expected) in enumerate(zip(params, naive.params())):
        dtype = _trajectory_dtype(actual, options)
        _assert_close(actual.detach(), expected, dtype, f"{label}: params[{index}]")
        state = opt.state.get(actual, {})
        for key, value in naive.state(index).items():
            if key == "step":
                assert float(state.get("step", 0.0)) == value, f"{label}: params[{index}].step"
            else:
                _assert_close(state[key], value, dtype, f"{label}: params[{index}].{key}")
    for index, (actual, expected) in enumerate(zip(opt.stats().kappa, naive.kappas())):
        _assert_close(actual, expected, torch.float32, f"{label}: kappa of group {index}")


def _set_grads(params: list[Tensor], grads: list[Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


@SETTINGS
@given(case=cases())
def test_step_matches_naive_model(case: Case) -> None:
    """Every step of a random configuration follows the spec, as the naive model computes it."""
    params = clone_params(case.params)
    opt = alr.ALROptimizer(params, backend="reference", **case.options)
    naive = NaiveALR(case.params, **case.options)
    for step, grads in enumerate(case.grads):
        _set_grads(params, grads)
        opt.step()
        naive.step(grads)
        _assert_matches_naive(opt, params, naive, case.options, f"step {step + 1}")


@SETTINGS
@given(case=cases(), bad=st.sampled_from([math.inf, -math.inf, math.nan]), data=st.data())
def test_nonfinite_gradient_never_changes_anything(case: Case, bad: float, data: st.DataObject) -> None:
    """After any history, a step with one inf or nan gradient element leaves every tensor's bits.

    The bad step gives gradients only to parameters that already have state: a parameter's
    state is created lazily by its first step, skipped or not, as torch's fused optimizers do.
    """
    params = clone_params(case.params)
    opt = alr.ALROptimizer(params, backend="reference", skip_nonfinite=True, **case.options)
    for grads in case.grads:
        _set_grads(params, grads)
        opt.step()
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    bad_grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype) if opt.state.get(p) else None for p in params]
    candidates = [i for i, g in enumerate(bad_grads) if g is not None and g.numel()]
    assume(candidates)
    index = data.draw(st.sampled_from(candidates), label="bad parameter")
    element = data.draw(st.integers(0, bad_grads[index].numel() - 1), label="bad element")
    bad_grads[index].view(-1)[element] = bad
    _set_grads(params, bad_grads)
    before, skipped = snapshot(opt, params), int(opt.stats().skipped_steps)
    opt.step()
    after = snapshot(opt, params)
    assert len(after) == len(before)
    for i, (a, b) in enumerate(zip(after, before)):
        assert_bit_identical(a, b, f"tensor {i}")
    assert int(opt.stats().skipped_steps) == skipped + 1
