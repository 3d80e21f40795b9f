"""The optimizer-wide gradient statistics: global clipping, nonfinite skipping and GradScaler.

(a) ``max_grad_norm`` equals ``torch.nn.utils.clip_grad_norm_`` + ``torch.optim.AdamW``;
(b) a step with an inf or nan gradient changes nothing and the run resumes as if it never
happened; (c) alr.AdamW under ``torch.amp.GradScaler`` equals torch.optim.AdamW under it.
Every optimizer uses ``backend="reference"``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import alr
from helpers import (
    SHAPES,
    assert_bit_identical,
    assert_optimizer_state_close,
    assert_tensors_close,
    clone_params,
    make_params,
    set_grads,
    snapshot,
)
from naive import NaiveALR

STEPS = 20

# --------------------------------------------------------------------------- (a) clipping

MAX_NORM = 2.0
GRAD_SCALES = (0.05, 5.0, 5.0)
"""Cycled per step: the global norm of ``set_grads`` is about 5.5·scale, so below and above M."""

CLIPPING_OPTIMIZERS = {
    "alr.AdamW": lambda groups: alr.AdamW(groups, max_grad_norm=MAX_NORM, backend="reference"),
    "ALROptimizer-off": lambda groups: alr.ALROptimizer(
        groups, algorithm="adamw", hypergrad="off", max_grad_norm=MAX_NORM, backend="reference"
    ),
}


def two_groups(params: list[Tensor]) -> list[dict]:
    """Two param groups with different learning rates and weight decays."""
    return [
        {"params": params[:3], "lr": 0.01, "weight_decay": 0.1},
        {"params": params[3:], "lr": 0.003, "weight_decay": 0.0},
    ]


@pytest.mark.parametrize("make_opt", CLIPPING_OPTIMIZERS.values(), ids=CLIPPING_OPTIMIZERS.keys())
def test_clipping_matches_clip_grad_norm_then_adamw(make_opt) -> None:
    """Same trajectory as clip_grad_norm_(foreach=True) + torch AdamW; grad_norm is its norm."""
    params = make_params(SHAPES)
    expected_params = clone_params(params)
    opt = make_opt(two_groups(params))
    expected_opt = torch.optim.AdamW(two_groups(expected_params), foreach=False)
    norms = []
    for step in range(STEPS):
        set_grads([params, expected_params], seed=step, scale=GRAD_SCALES[step % len(GRAD_SCALES)])
        grads_before = [p.grad.clone() for p in params]
        norm = torch.nn.utils.clip_grad_norm_(expected_params, MAX_NORM, foreach=True)
        expected_opt.step()
        opt.step()
        assert_optimizer_state_close(opt, params, expected_opt, expected_params)
        assert_tensors_close(opt.stats().grad_norm, norm, f"step {step + 1}: grad_norm")
        for index, (p, before) in enumerate(zip(params, grads_before)):
            assert_bit_identical(p.grad, before, f"step {step + 1}: params[{index}].grad was modified")
        norms.append(float(norm))
    assert min(norms) < MAX_NORM < max(norms), norms


# ------------------------------------------------------------------------ (b) nonfinite

BAD_STEP = 4
BAD_VALUES = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}

SKIPPING_OPTIMIZERS = {
    "adamw-mult-group-one-pass": dict(algorithm="adamw"),
    "adamw-mult-tensor-one-pass": dict(algorithm="adamw", hypergrad_scope="tensor"),
    "adamw-mult-group-exact": dict(algorithm="adamw", hypergrad_exact=True),
    "adam-mult-tensor-exact-amsgrad": dict(
        algorithm="adam", amsgrad=True, hypergrad_scope="tensor", hypergrad_exact=True
    ),
    "sgd-momentum-mult-tensor-one-pass": dict(algorithm="sgd", momentum=0.9, dampening=0.3, hypergrad_scope="tensor"),
    "sgd-nesterov-mult-group-exact": dict(algorithm="sgd", momentum=0.9, nesterov=True, hypergrad_exact=True),
}


def _skipping_opt(params: list[Tensor], options: dict) -> alr.ALROptimizer:
    return alr.ALROptimizer(
        two_groups(params), hypergrad="mult", hypergrad_lr=0.1, skip_nonfinite=True, backend="reference", **options
    )


def _poison(params: list[Tensor], seed: int, value: float) -> None:
    """Finite gradients except one element of one tensor, set to ``value``."""
    set_grads([params], seed=seed)
    params[0].grad[1, 2] = value


def _assert_snapshots_identical(actual: list[Tensor], expected: list[Tensor], label: str) -> None:
    assert len(actual) == len(expected), f"{label}: {len(actual)} tensors vs {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert_bit_identical(a, e, f"{label}: tensor {index}")


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("options", SKIPPING_OPTIMIZERS.values(), ids=SKIPPING_OPTIMIZERS.keys())
def test_nonfinite_step_is_skipped_bit_identically(options: dict, value: float) -> None:
    """The bad step changes nothing but the skip counter; later steps match a run that never saw it."""
    params = make_params(SHAPES)
    clean_params = clone_params(params)
    opt, clean_opt = _skipping_opt(params, options), _skipping_opt(clean_params, options)
    for step in range(STEPS):
        if step == BAD_STEP:
            assert not all(torch.equal(k, torch.ones_like(k)) for k in opt.stats().kappa), "kappa never moved"
            _poison(params, seed=step, value=value)
            before, skipped = snapshot(opt, params), opt.stats().skipped_steps
            opt.step()
            _assert_snapshots_identical(snapshot(opt, params), before, "bad step")
            assert opt.stats().skipped_steps == skipped + 1
            continue
        set_grads([params, clean_params], seed=step)
        opt.step()
        clean_opt.step()
        _assert_snapshots_identical(snapshot(opt, params), snapshot(clean_opt, clean_params), f"step {step + 1}")
    assert opt.stats().skipped_steps == 1 and clean_opt.stats().skipped_steps == 0


SGD_DAMPENED = {
    "momentum-dampening": dict(momentum=0.9, dampening=0.5),
    "momentum-dampening-decay-maximize": dict(momentum=0.9, dampening=0.5, weight_decay=0.1, maximize=True),
}


@pytest.mark.parametrize("options", SGD_DAMPENED.values(), ids=SGD_DAMPENED.keys())
def test_sgd_first_step_skipped_still_copies_gradient_into_buffer(options: dict) -> None:
    """A skipped first step is not a step: the first real one copies g into the momentum buffer."""
    params = make_params(SHAPES)
    expected_params = clone_params(params)
    opt = alr.SGD(params, lr=0.01, skip_nonfinite=True, backend="reference", **options)
    expected_opt = torch.optim.SGD(expected_params, lr=0.01, foreach=False, **options)
    _poison(params, seed=100, value=math.nan)
    opt.step()
    assert opt.stats().skipped_steps == 1
    for step in range(STEPS):
        set_grads([params, expected_params], seed=step)
        opt.step()
        expected_opt.step()
        assert_optimizer_state_close(opt, params, expected_opt, expected_params)


def test_sgd_first_step_skipped_with_hypergrad_matches_naive_model() -> None:
    """The same with κ adapting: the naive model skips too and both agree afterwards."""
    options = dict(algorithm="sgd", lr=0.01, momentum=0.9, dampening=0.5, hypergrad="mult", hypergrad_lr=0.1)
    params = make_params(SHAPES)
    opt = alr.ALROptimizer(params, backend="reference", **options)
    naive = NaiveALR(clone_params(params), **options)
    _poison(params, seed=100, value=math.inf)
    opt.step()
    naive.step([p.grad for p in params])
    for step in range(STEPS):
        set_grads([params], seed=step)
        opt.step()
        naive.step([p.grad for p in params])
        for index, (actual, expected) in enumerate(zip(params, naive.params())):
            assert_tensors_close(actual.detach(), expected.float(), f"step {step + 1}: params[{index}]")
            buffer = naive.state(index).get("momentum_buffer")
            if buffer is not None:
                assert_tensors_close(opt.state[actual]["momentum_buffer"], buffer.float(), f"step {step + 1}: buffer")
        assert_tensors_close(opt.stats().kappa[0], naive.kappas()[0].float(), f"step {step + 1}: kappa")
    assert naive.skipped_steps == int(opt.stats().skipped_steps) == 1


# ----------------------------------------------------------------------------- (c) AMP

AMP_STEPS = 10
INF_STEPS = (3, 7)
"""Steps whose gradients get an inf after backward: the scaler skips them and backs off."""

AMP_VARIANTS = {
    "step": dict(unscale_first=False, clip=False),
    "unscale-then-step": dict(unscale_first=True, clip=False),
    "clip-inside-step": dict(unscale_first=False, clip=True),
    "unscale-then-clip-inside-step": dict(unscale_first=True, clip=True),
}


def _scaler() -> torch.amp.GradScaler:
    # A short growth interval makes the scale grow as well as back off within AMP_STEPS.
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)


def _amp_iteration(model, opt, scaler, x: Tensor, step: int, unscale_first: bool, clip_after_unscale: bool) -> None:
    """One training iteration: scaled backward, optional inf injection, unscale/clip, step, update."""
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    if step in INF_STEPS:
        model.weight.grad[0, 1] = math.inf
    if unscale_first or clip_after_unscale:
        scaler.unscale_(opt)
    if clip_after_unscale:
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("skip_nonfinite", (False, True), ids=("found-inf-only", "also-skip-nonfinite"))
@pytest.mark.parametrize("variant", AMP_VARIANTS.values(), ids=AMP_VARIANTS.keys())
def test_grad_scaler_matches_torch_adamw(variant: dict, skip_nonfinite: bool) -> None:
    """alr.AdamW + GradScaler == torch AdamW + GradScaler: parameters, state and scale each step."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    expected_model = copy.deepcopy(model)
    max_grad_norm = MAX_NORM if variant["clip"] else None
    opt = alr.AdamW(
        model.parameters(), lr=0.05, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, backend="reference"
    )
    expected_opt = torch.optim.AdamW(expected_model.parameters(), lr=0.05, foreach=False, fused=False)
    scaler, expected_scaler = _scaler(), _scaler()
    assert opt._step_supports_amp_scaling
    inputs = torch.Generator().manual_seed(1)
    scales = [scaler.get_scale()]
    for step in range(AMP_STEPS):
        x = torch.randn(8, 4, generator=inputs)
        unscale_first = variant["unscale_first"]
        _amp_iteration(model, opt, scaler, x, step, unscale_first, clip_after_unscale=False)
        _amp_iteration(expected_model, expected_opt, expected_scaler, x, step, unscale_first, variant["clip"])
        assert scaler.get_scale() == expected_scaler.get_scale(), f"step {step + 1}: scale"
        assert_optimizer_state_close(opt, list(model.parameters()), expected_opt, list(expected_model.parameters()))
        scales.append(scaler.get_scale())
    assert int(opt.stats().skipped_steps) == len(INF_STEPS)
    grew = any(after > before for before, after in zip(scales, scales[1:]))
    backed_off = all(scales[step + 1] < scales[step] for step in INF_STEPS)
    assert grew and backed_off, f"the scale should grow, and back off at steps {INF_STEPS}: {scales}"
