"""The hypergradient adaptation of κ: ALROptimizer against the naive float64 model.

Each test feeds the same gradients to an :class:`alr.ALROptimizer` on float32 parameters
(``backend="reference"``) and to :class:`naive.NaiveALR`, and compares parameters, every
state entry and κ after every step with ``helpers.tolerances(torch.float32)``.

Gradients are injected rather than computed from the parameters, so both models see
bit-identical inputs and the float32 error cannot feed back through a loss; measured over
every case here the largest error is a few percent of the tolerance, with no trend in κ.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

import alr
from helpers import SHAPES, assert_tensors_close, clone_params, make_params, tolerances
from naive import NaiveALR

STEPS = 20
GROUP_LRS = (0.01, 0.005)
"""Two param groups with different learning rates (``add`` divides by each)."""

ALGORITHMS = {
    "adam-coupled-decay": dict(algorithm="adam", weight_decay=0.05),
    "adamw-decoupled-decay": dict(algorithm="adamw", weight_decay=0.05),
    "sgd": dict(algorithm="sgd", weight_decay=0.05),
    "sgd-momentum": dict(algorithm="sgd", momentum=0.9, dampening=0.2, weight_decay=0.05),
    "sgd-nesterov": dict(algorithm="sgd", momentum=0.9, nesterov=True, weight_decay=0.05),
}

HYPERGRAD_LR = {"mult": 0.05, "add": 1e-5}
"""Large enough that κ moves visibly within STEPS, small enough to stay inside the bounds."""

MODES = {
    f"{mode}-{scope}-{'exact' if exact else 'one-pass'}": dict(
        hypergrad=mode, hypergrad_lr=HYPERGRAD_LR[mode], hypergrad_scope=scope, hypergrad_exact=exact
    )
    for mode, scope, exact in itertools.product(("mult", "add"), ("group", "tensor"), (False, True))
}
# ρ = 0.5 makes the running mean of ‖g‖² catch up within a few steps, so with the noisy
# gradients below it exceeds ‖g‖² about half the time and the max() of the rule is exercised
# both ways (the default ρ = 0.99 stays below ‖g‖² for 20 steps of steady gradients).
MODES.update(
    {
        f"mult-{scope}-one-pass-fast-norm": dict(
            hypergrad="mult", hypergrad_lr=HYPERGRAD_LR["mult"], hypergrad_scope=scope, hypergrad_norm_decay=0.5
        )
        for scope in ("group", "tensor")
    }
)


class Twin:
    """An ALROptimizer on float32 parameters and the naive model, stepped with the same gradients."""

    def __init__(self, options: dict, shapes=SHAPES, lrs=GROUP_LRS) -> None:
        self.params = make_params(shapes)
        split = (len(shapes) + 1) // 2 if len(lrs) == 2 else len(shapes)
        self.opt = alr.ALROptimizer(_groups(self.params, split, lrs), backend="reference", **options)
        self.naive = NaiveALR(_groups(clone_params(self.params), split, lrs), **options)

    def step(self, grads: list[Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.opt.step()
        self.naive.step(grads)

    def kappas(self) -> list[Tensor]:
        return self.opt.stats().kappa

    def assert_matches_naive(self, label: str) -> None:
        """Parameters, each state entry the spec defines, and κ agree with the naive model."""
        for index, (actual, expected) in enumerate(zip(self.params, self.naive.params())):
            assert_tensors_close(actual.detach(), expected.float(), f"{label}: params[{index}]")
            state = self.opt.state[actual]
            for key, value in self.naive.state(index).items():
                assert key in state, f"{label}: params[{index}] has no state {key!r}"
                if key == "step":
                    assert float(state[key]) == value, f"{label}: params[{index}].step"
                else:
                    assert_tensors_close(state[key], value.float(), f"{label}: params[{index}].{key}")
        for index, (actual, expected) in enumerate(zip(self.kappas(), self.naive.kappas())):
            assert_tensors_close(actual, expected.float(), f"{label}: kappa of group {index}")


def _groups(params: list[Tensor], split: int, lrs: tuple[float, ...]) -> list[dict]:
    chunks = [params[:split], params[split:]] if len(lrs) == 2 else [params]
    return [{"params": chunk, "lr": lr} for chunk, lr in zip(chunks, lrs)]


def drifting_grads(shapes, step: int) -> list[Tensor]:
    """A fixed direction plus noise: consecutive gradients mostly agree, so κ drifts up."""
    direction = torch.Generator().manual_seed(1)
    noise = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=direction) + 0.5 * torch.randn(s, generator=noise) for s in shapes]


def sign_grads(shapes, step: int, alternate: bool) -> list[Tensor]:
    """±1 in a fixed pattern: the same every step (aligned) or negated every step (anti-aligned)."""
    pattern = torch.Generator().manual_seed(2)
    sign = -1.0 if alternate and step % 2 else 1.0
    return [sign * torch.randn(s, generator=pattern).sign() for s in shapes]


def _is_all(kappa: Tensor, value: float) -> bool:
    return torch.equal(kappa, torch.full_like(kappa, value))


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("algorithm", ALGORITHMS.values(), ids=ALGORITHMS.keys())
def test_adaptation_matches_naive_model(algorithm: dict, mode: dict) -> None:
    """20 steps over two groups: same trajectory, state and κ as the spec; κ really moves."""
    twin = Twin({**algorithm, **mode})
    for step in range(STEPS):
        twin.step(drifting_grads(SHAPES, step))
        twin.assert_matches_naive(f"step {step + 1}")
        if step == 0:
            # d_0 = 0 makes every statistic zero, so κ after step 1 is still exactly 1
            # (one-pass: step 2 runs with κ = 1 too; exact: step 1 ran with κ = 1).
            assert all(_is_all(k, 1.0) for k in twin.kappas()), twin.kappas()
    for index, kappa in enumerate(twin.kappas()):
        assert (kappa - 1).abs().max() > 0.02, f"kappa of group {index} did not move: {kappa}"


def test_exact_and_one_pass_differ() -> None:
    """The two schedules are distinguishable, so matching each against the model means something."""
    runs = {}
    for exact in (False, True):
        twin = Twin({**ALGORITHMS["adamw-decoupled-decay"], **MODES["mult-group-one-pass"], "hypergrad_exact": exact})
        for step in range(5):
            twin.step(drifting_grads(SHAPES, step))
        runs[exact] = twin.params[0].detach().clone()
    rtol, atol = tolerances(torch.float32)
    assert not torch.allclose(runs[False], runs[True], rtol=rtol, atol=atol)


def test_add_rule_keeps_kappa_while_lr_is_zero() -> None:
    """``add`` divides by lr: a group with lr = 0 keeps κ = 1 while the other group adapts."""
    twin = Twin({**ALGORITHMS["sgd-momentum"], **MODES["add-group-one-pass"]}, lrs=(0.0, 0.01))
    for step in range(STEPS):
        twin.step(drifting_grads(SHAPES, step))
        twin.assert_matches_naive(f"step {step + 1}")
    frozen, adapted = twin.kappas()
    assert _is_all(frozen, 1.0), frozen
    assert (adapted - 1).abs().max() > 0.02, adapted


def test_mult_adaptation_fades_with_vanishing_gradients() -> None:
    """Aligned gradients that shrink by half every step: the plain cosine (ρ = 0) keeps raising
    κ by (1 + β) per step, while the default normaliser (the running RMS of ‖g‖) lets κ rise
    only until the gradients fall below their running RMS."""
    kappas = {}
    for rho in (0.0, 0.99):
        options = dict(algorithm="sgd", momentum=0.9, hypergrad="mult", hypergrad_lr=0.1, hypergrad_norm_decay=rho)
        twin = Twin(options, lrs=(0.01,))
        for step in range(STEPS):
            twin.step([0.5**step * g for g in sign_grads(SHAPES, 0, alternate=False)])
            twin.assert_matches_naive(f"ρ={rho} step {step + 1}")
        kappas[rho] = float(twin.kappas()[0][0])
    # The direction d_0 = 0 holds κ at 1 for the first step; every later cosine is 1.
    assert kappas[0.0] == pytest.approx(1.1 ** (STEPS - 1), rel=1e-5)
    assert 1.0 < kappas[0.99] < 1.6, kappas


BOUND_SHAPES = [(3, 4), (16,), (5, 1, 2)]
"""Every tensor has ≥ 10 elements, so each per-tensor κ also moves fast enough to hit a bound."""

KAPPA_MIN, KAPPA_MAX = 0.125, 8.0
BOUND_HYPERGRAD_LR = {"mult": 0.5, "add": 1e-3}

BOUND_SCHEDULES = {"group-one-pass": ("group", False), "tensor-exact": ("tensor", True)}
DIRECTIONS = {"aligned-to-kappa-max": (False, KAPPA_MAX), "anti-aligned-to-kappa-min": (True, KAPPA_MIN)}


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
@pytest.mark.parametrize("schedule", BOUND_SCHEDULES.values(), ids=BOUND_SCHEDULES.keys())
@pytest.mark.parametrize("mode", ("mult", "add"))
@pytest.mark.parametrize("algorithm", ALGORITHMS.values(), ids=ALGORITHMS.keys())
def test_kappa_reaches_bound_exactly(algorithm: dict, mode: str, schedule: tuple, direction: tuple) -> None:
    """Consistently (anti-)aligned gradients drive κ onto kappa_max (kappa_min), and it stays there."""
    scope, exact = schedule
    alternate, bound = direction
    options = dict(
        algorithm,
        hypergrad=mode,
        hypergrad_lr=BOUND_HYPERGRAD_LR[mode],
        hypergrad_scope=scope,
        hypergrad_exact=exact,
        kappa_min=KAPPA_MIN,
        kappa_max=KAPPA_MAX,
    )
    twin = Twin(options, shapes=BOUND_SHAPES, lrs=(0.01,))
    reached_at = None
    for step in range(STEPS):
        twin.step(sign_grads(BOUND_SHAPES, step, alternate))
        twin.assert_matches_naive(f"step {step + 1}")
        if reached_at is None and _is_all(twin.kappas()[0], bound):
            reached_at = step
    assert reached_at is not None and reached_at < STEPS - 2, f"kappa never reached {bound}: {twin.kappas()}"
    assert _is_all(twin.kappas()[0], bound)
    assert _is_all(twin.naive.kappas()[0], bound)


@pytest.mark.parametrize("algorithm", ALGORITHMS.values(), ids=ALGORITHMS.keys())
def test_hypergrad_off_keeps_kappa_exactly_one(algorithm: dict) -> None:
    """With the adaptation off κ is exactly 1 at every step and the trajectory is the spec's."""
    twin = Twin({**algorithm, "hypergrad": "off"})
    for step in range(STEPS):
        twin.step(drifting_grads(SHAPES, step))
        assert all(_is_all(k, 1.0) for k in twin.kappas()), twin.kappas()
        twin.assert_matches_naive(f"step {step + 1}")


HUGE = 3e19
"""A finite float32 gradient element whose square, 9e38, overflows float32 (max 3.4e38)."""

HUGE_GRAD_ALGORITHMS = {k: ALGORITHMS[k] for k in ("adamw-decoupled-decay", "sgd", "sgd-momentum")}


@pytest.mark.parametrize("mode", ("mult", "add", "off"))
@pytest.mark.parametrize("algorithm", HUGE_GRAD_ALGORITHMS.values(), ids=HUGE_GRAD_ALGORITHMS.keys())
def test_kappa_stays_in_bounds_for_huge_finite_gradients(algorithm: dict, mode: str) -> None:
    """κ stays in [kappa_min, kappa_max] and the parameters finite, whatever the finite gradient.

    Random-sign gradients of magnitude 3e19 are finite, so ``skip_nonfinite`` lets every step
    through, and the update itself stays finite ("off" is the control). The spec's rules are
    bounded for any finite input: ``|c| ≤ 1`` by Cauchy-Schwarz, and κ is clamped.

    The float32 statistics overflow here: ``gg = inf``, so at step 1 (``d_0 = 0``) the mult
    cosine is ``0 / (inf·0 + tiny) = nan``, and single products ``g_i·d_i`` overflow to ±inf,
    whose sum is nan for add. ``clamp`` passes nan through, so κ and then every parameter
    become nan while ``skipped_steps`` stays 0.
    """
    params = make_params(BOUND_SHAPES)
    opt = alr.ALROptimizer(
        params, lr=1e-3, hypergrad=mode, hypergrad_lr=BOUND_HYPERGRAD_LR.get(mode), backend="reference", **algorithm
    )
    signs = torch.Generator().manual_seed(3)
    for step in range(5):
        for p in params:
            p.grad = HUGE * torch.randint(0, 2, p.shape, generator=signs).mul(2).sub(1).float()
        opt.step()
        kappa = opt.stats().kappa[0]
        assert int(opt.stats().skipped_steps) == 0
        assert ((kappa >= opt.defaults["kappa_min"]) & (kappa <= opt.defaults["kappa_max"])).all(), (
            f"step {step + 1}: kappa {kappa.tolist()} left its bounds"
        )
        assert all(torch.isfinite(p).all() for p in params), f"step {step + 1}: a parameter became nonfinite"


@pytest.mark.parametrize("exact", [False, True])
def test_tensor_without_gradient_keeps_its_kappa_and_running_mean(any_backend, exact: bool) -> None:
    """Tensor scope: a step in which a tensor has no gradient leaves its κ and ``a`` as they
    were (torch.optim does not step it), while the others adapt."""
    backend, device = any_backend
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=generator).to(device).requires_grad_() for n in (8, 5)]
    opt = alr.ALROptimizer(params, lr=0.1, backend=backend, hypergrad="mult", hypergrad_scope="tensor",
                           hypergrad_lr=0.5, hypergrad_exact=exact, skip_nonfinite=False)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(device)
        opt.step()
    group = opt.param_groups[0]
    kappa, avg = opt.stats().kappa[0].clone(), group["hypergrad_grad_sq_avg"].clone()
    params[1].grad = None
    params[0].grad = torch.randn(8, generator=generator).to(device)
    opt.step()
    new_kappa, new_avg = opt.stats().kappa[0], group["hypergrad_grad_sq_avg"]
    assert torch.equal(new_kappa[1], kappa[1]) and torch.equal(new_avg[1], avg[1])
    assert not torch.equal(new_avg[0], avg[0]) and not torch.equal(new_kappa[0], kappa[0])
