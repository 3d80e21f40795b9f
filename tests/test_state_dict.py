"""Checkpoints: alr round trips, interchange with torch.optim, and the state layout."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

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

TORCH_STATE_KEYS = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"}
GRAD_SCALE = 2.0  # gradients of norm ~9, so that max_grad_norm=1 clips


def _through_bytes(state_dict: dict, map_location: str | None = None) -> dict:
    """``torch.save`` into memory and ``torch.load`` back (torch's default weights_only)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location=map_location)


def _train(opt: torch.optim.Optimizer, params: list[Tensor], steps: range) -> None:
    for step in steps:
        set_grads([params], step, scale=GRAD_SCALE)
        opt.step()


def _assert_same_bits(actual: list[Tensor], expected: list[Tensor]) -> None:
    assert len(actual) == len(expected)
    for index, (got, want) in enumerate(zip(actual, expected)):
        assert_bit_identical(got, want, f"tensor {index}")


def _adaptive(**options) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        return alr.ALROptimizer(params, lr=0.01, hypergrad_lr=0.1, max_grad_norm=1.0, backend="reference", **options)

    return make


_RESUMABLE = [
    pytest.param(
        _adaptive(hypergrad="mult", hypergrad_scope="group", hypergrad_norm_decay=0.5), id="mult-group-fast-norm-adamw"
    ),
    pytest.param(_adaptive(hypergrad="mult", hypergrad_scope="tensor"), id="mult-tensor-adamw"),
    pytest.param(
        _adaptive(hypergrad="mult", hypergrad_scope="tensor", algorithm="sgd", momentum=0.9, nesterov=True),
        id="mult-tensor-nesterov_sgd",
    ),
    pytest.param(_adaptive(hypergrad="add", hypergrad_exact=True, algorithm="adam", amsgrad=True), id="add-exact-adam"),
    pytest.param(lambda params: alr.SGD(params, lr=0.05, momentum=0.9, dampening=0.1), id="alr.SGD-momentum"),
]


@pytest.mark.parametrize("map_location", [None, "cpu"], ids=["no_map_location", "map_location_cpu"])
@pytest.mark.parametrize("make_opt", _RESUMABLE)
def test_round_trip_continues_bit_identically(make_opt, map_location) -> None:
    params = make_params(SHAPES)
    opt = make_opt(params)
    _train(opt, params, range(5))

    loaded = _through_bytes(opt.state_dict(), map_location)
    resumed_params = clone_params(params)
    resumed = make_opt(resumed_params)
    resumed.load_state_dict(loaded)
    _assert_same_bits(snapshot(resumed, resumed_params), snapshot(opt, params))

    for step in range(5, 10):
        set_grads([params, resumed_params], step, scale=GRAD_SCALE)
        opt.step()
        resumed.step()
        _assert_same_bits(snapshot(resumed, resumed_params), snapshot(opt, params))
    for got, want in zip(resumed.stats().kappa, opt.stats().kappa):
        assert_bit_identical(got, want, "kappa")
    for got, want in zip(resumed.param_groups, opt.param_groups):
        if "hypergrad_grad_sq_avg" in want:
            assert_bit_identical(got["hypergrad_grad_sq_avg"], want["hypergrad_grad_sq_avg"], "grad_sq_avg")
    assert_bit_identical(resumed.stats().grad_norm, opt.stats().grad_norm, "grad_norm")
    if opt.param_groups[0]["hypergrad"] != "off":
        assert any(bool((k != 1).any()) for k in opt.stats().kappa), "kappa never adapted"


# (torch class, alr class, shared constructor options)
_INTERCHANGEABLE = [
    pytest.param(torch.optim.AdamW, alr.AdamW, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}, id="AdamW"),
    pytest.param(torch.optim.Adam, alr.Adam, {"lr": 0.01, "weight_decay": 0.1}, id="Adam"),
    pytest.param(torch.optim.SGD, alr.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}, id="SGD-dampening"),
    pytest.param(torch.optim.SGD, alr.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}, id="SGD-nesterov"),
]


def _continue_in_lockstep(alr_opt, alr_params, torch_opt, torch_params, steps: range) -> None:
    """Both optimizers take the same steps; alr is compared against torch after each."""
    initial = [p.detach().clone() for p in alr_params]
    for step in steps:
        set_grads([alr_params, torch_params], step)
        alr_opt.step()
        torch_opt.step()
        assert_optimizer_state_close(alr_opt, alr_params, torch_opt, torch_params)
    assert not torch.equal(initial[0], alr_params[0].detach())
    assert not torch.equal(initial[0], torch_params[0].detach())


@pytest.mark.parametrize(("torch_cls", "alr_cls", "options"), _INTERCHANGEABLE)
def test_torch_checkpoint_resumes_in_alr(torch_cls, alr_cls, options) -> None:
    """torch trains 5 steps; alr loads its state dict and follows torch for 10 more."""
    torch_params = make_params(SHAPES)
    ref = torch_cls(torch_params, **options, foreach=False)
    _train(ref, torch_params, range(5))

    alr_params = clone_params(torch_params)
    opt = alr_cls(alr_params, **options)
    opt.load_state_dict(_through_bytes(ref.state_dict()))
    _continue_in_lockstep(opt, alr_params, ref, torch_params, range(5, 15))


@pytest.mark.parametrize(("torch_cls", "alr_cls", "options"), _INTERCHANGEABLE)
def test_alr_checkpoint_resumes_in_torch(torch_cls, alr_cls, options) -> None:
    """alr trains 5 steps; torch loads its state dict and follows alr for 10 more."""
    alr_params = make_params(SHAPES)
    opt = alr_cls(alr_params, **options)
    _train(opt, alr_params, range(5))

    torch_params = clone_params(alr_params)
    ref = torch_cls(torch_params, **options, foreach=False)
    ref.load_state_dict(_through_bytes(opt.state_dict()))
    if torch_cls is torch.optim.SGD:
        # torch's SGD counts no steps: the "step" it loaded from alr is inert and never advances.
        for state in ref.state.values():
            assert float(state.pop("step")) == 5
    _continue_in_lockstep(opt, alr_params, ref, torch_params, range(5, 15))


@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_torch_checkpoint_starts_the_adaptation_fresh(scope) -> None:
    """κ starts at 1 after loading a torch checkpoint, so the first step is torch's; then κ moves."""
    torch_params = make_params(SHAPES)
    ref = torch.optim.AdamW(torch_params, lr=0.02, weight_decay=0.05, foreach=False)
    _train(ref, torch_params, range(5))

    alr_params = clone_params(torch_params)
    opt = alr.ALROptimizer(
        alr_params,
        lr=1.0,
        algorithm="adamw",
        hypergrad="mult",
        hypergrad_lr=0.1,
        hypergrad_scope=scope,
        backend="reference",
    )
    opt.load_state_dict(_through_bytes(ref.state_dict()))
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["weight_decay"] == 0.05
    assert opt.param_groups[0]["hypergrad"] == "mult"
    assert all(torch.equal(k, torch.ones_like(k)) for k in opt.stats().kappa)

    _continue_in_lockstep(opt, alr_params, ref, torch_params, range(5, 6))
    before = [p.detach().clone() for p in alr_params]
    _train(opt, alr_params, range(6, 12))
    assert any(bool((k != 1).any()) for k in opt.stats().kappa), "kappa never adapted"
    assert not torch.equal(before[0], alr_params[0].detach())
    assert float(opt.state[alr_params[0]]["step"]) == 12


# (alr factory, torch factory, per-parameter keys alr keeps beyond torch's)
_LAYOUTS = [
    pytest.param(
        lambda ps: alr.Adam(ps, amsgrad=True), lambda ps: torch.optim.Adam(ps, amsgrad=True), set(),
        id="Adam-amsgrad",
    ),
    pytest.param(lambda ps: alr.AdamW(ps), lambda ps: torch.optim.AdamW(ps), set(), id="AdamW"),
    pytest.param(
        lambda ps: alr.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        {"step"},
        id="SGD-momentum",
    ),
    pytest.param(
        lambda ps: alr.ALROptimizer(ps, algorithm="adamw", amsgrad=True, backend="reference"),
        lambda ps: torch.optim.AdamW(ps, amsgrad=True),
        set(),
        id="ALROptimizer-adamw",
    ),
    pytest.param(
        lambda ps: alr.ALROptimizer(ps, algorithm="sgd", momentum=0.9, backend="reference"),
        lambda ps: torch.optim.SGD(ps, momentum=0.9),
        {"step"},
        id="ALROptimizer-momentum_sgd",
    ),
    pytest.param(
        lambda ps: alr.ALROptimizer(ps, algorithm="sgd", momentum=0.9, nesterov=True, backend="reference"),
        lambda ps: torch.optim.SGD(ps, momentum=0.9, nesterov=True),
        {"step", "hypergrad_prev_direction"},
        id="ALROptimizer-nesterov_sgd",
    ),
    pytest.param(
        lambda ps: alr.ALROptimizer(ps, algorithm="sgd", backend="reference"),
        lambda ps: torch.optim.SGD(ps),
        {"step", "hypergrad_prev_direction"},
        id="ALROptimizer-plain_sgd",
    ),
]


@pytest.mark.parametrize(("make_alr", "make_torch", "alr_only"), _LAYOUTS)
def test_state_layout_uses_torch_keys(make_alr, make_torch, alr_only) -> None:
    """torch's keys with torch's shapes and dtypes; alr's own keys are named ``hypergrad_*``."""
    alr_params = make_params(SHAPES)
    torch_params = clone_params(alr_params)
    opt, ref = make_alr(alr_params), make_torch(torch_params)
    _train(opt, alr_params, range(2))
    _train(ref, torch_params, range(2))

    state_dict, torch_state_dict = opt.state_dict(), ref.state_dict()
    assert state_dict["state"].keys() == set(range(len(SHAPES)))
    for index, state in state_dict["state"].items():
        torch_state = torch_state_dict["state"].get(index, {})
        assert set(state) - set(torch_state) == alr_only
        assert all(key in TORCH_STATE_KEYS or key.startswith("hypergrad_") for key in state), set(state)
        for key, value in torch_state.items():
            assert (state[key].shape, state[key].dtype) == (value.shape, value.dtype), key

    adapts = opt.param_groups[0]["hypergrad"] != "off"
    for group in state_dict["param_groups"]:
        assert isinstance(group.get("hypergrad_kappa"), Tensor) is adapts
        assert isinstance(group.get("hypergrad_grad_sq_avg"), Tensor) is adapts


def test_switching_backend_mid_training_continues_identically(monkeypatch) -> None:
    """Alternating ``group["backend"]`` between "auto" and "reference" keeps the run on the
    reference's trajectory: the state layout is backend-independent, and a native backend
    chosen by "auto" matches the reference within the shared tolerances."""
    monkeypatch.delenv("ALR_BACKEND", raising=False)
    params = make_params(SHAPES)
    twin_params = clone_params(params)
    make = _adaptive(hypergrad="mult", hypergrad_scope="tensor")
    opt, twin = make(params), make(twin_params)
    for step in range(10):
        for group in opt.param_groups:
            group["backend"] = "auto" if step % 2 == 0 else "reference"
        set_grads([params, twin_params], step, scale=GRAD_SCALE)
        opt.step()
        twin.step()
        assert_optimizer_state_close(opt, params, twin, twin_params)
        for got, want in zip(opt.stats().kappa, twin.stats().kappa):
            assert_tensors_close(got, want, f"step {step + 1}: kappa")
    assert any(bool((k != 1).any()) for k in opt.stats().kappa)
