"""torch.optim.lr_scheduler drives alr's optimizers exactly as it drives torch's.

Each test trains an alr optimizer and its torch namesake with the same scheduler and the
same gradients, and compares every group's learning rate (and the momentum or betas that
OneCycleLR cycles) after each scheduler step, plus parameters and state.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.optim import lr_scheduler

import alr
from helpers import (
    SHAPES,
    assert_optimizer_state_close,
    assert_tensors_close,
    clone_params,
    make_params,
    set_grads,
)

STEPS = 15

# Validation losses fed to ReduceLROnPlateau: improving, then a plateau that triggers it.
PLATEAU_LOSSES = [1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.6, 0.6, 0.6, 0.6]

SchedulerFactory = Callable[[torch.optim.Optimizer], object]

_SCHEDULERS = [
    pytest.param(lambda opt: lr_scheduler.StepLR(opt, step_size=4, gamma=0.5), id="StepLR"),
    pytest.param(lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[3, 7, 11], gamma=0.3), id="MultiStepLR"),
    pytest.param(lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4), id="CosineAnnealingLR"),
    pytest.param(
        lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.2], total_steps=STEPS, cycle_momentum=True),
        id="OneCycleLR",
    ),
    pytest.param(
        lambda opt: lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1), id="ReduceLROnPlateau"
    ),
    pytest.param(
        lambda opt: lr_scheduler.LambdaLR(opt, lr_lambda=[lambda e: 0.9**e, lambda e: 1 / (1 + e)]), id="LambdaLR"
    ),
    pytest.param(
        lambda opt: lr_scheduler.SequentialLR(
            opt,
            [lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4), lr_scheduler.ExponentialLR(opt, gamma=0.8)],
            milestones=[5],
        ),
        id="SequentialLR",
    ),
]

# (alr class, torch class, defaults); two groups, the second with its own lr
_OPTIMIZERS = [
    pytest.param(alr.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}, id="AdamW"),
    pytest.param(alr.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, id="SGD-momentum"),
]


def _make(cls: type, params: list[Tensor], defaults: dict, tensor_lr: bool, **extra) -> torch.optim.Optimizer:
    """Two groups, the second at twice the lr; a Tensor lr is a fresh tensor per optimizer,
    since schedulers update it in place."""
    lr = defaults["lr"]
    as_lr = (lambda value: torch.tensor(value)) if tensor_lr else (lambda value: value)
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": as_lr(2 * lr)}]
    return cls(groups, **{**defaults, "lr": as_lr(lr)}, **extra)


def _scheduled_values(opt: torch.optim.Optimizer) -> list[tuple]:
    """What a scheduler may write into each group: lr and (OneCycleLR) momentum or betas."""
    return [(float(group["lr"]), group.get("momentum"), group.get("betas")) for group in opt.param_groups]


def _scheduler_step(scheduler, step: int) -> None:
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        scheduler.step(PLATEAU_LOSSES[step])
    else:
        scheduler.step()


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("make_scheduler", _SCHEDULERS)
@pytest.mark.parametrize(("alr_cls", "torch_cls", "defaults"), _OPTIMIZERS)
def test_scheduler_drives_alr_like_torch(alr_cls, torch_cls, defaults, make_scheduler, tensor_lr) -> None:
    alr_params = make_params(SHAPES)
    torch_params = clone_params(alr_params)
    opt = _make(alr_cls, alr_params, defaults, tensor_lr)
    ref = _make(torch_cls, torch_params, defaults, tensor_lr, foreach=False)
    scheduler, torch_scheduler = make_scheduler(opt), make_scheduler(ref)
    assert _scheduled_values(opt) == _scheduled_values(ref)

    history = [_scheduled_values(opt)]
    for step in range(STEPS):
        set_grads([alr_params, torch_params], step)
        opt.step()
        ref.step()
        assert_optimizer_state_close(opt, alr_params, ref, torch_params)
        _scheduler_step(scheduler, step)
        _scheduler_step(torch_scheduler, step)
        assert _scheduled_values(opt) == _scheduled_values(ref), f"after step {step}"
        history.append(_scheduled_values(opt))

    assert len({str(values) for values in history}) > 1, "the scheduler never changed anything"


def test_scheduler_owns_lr_while_kappa_adapts_separately() -> None:
    """With hypergrad on, ``group["lr"]`` is exactly the scheduler's and κ multiplies it.

    Plain SGD makes the applied rate observable: each update is ``-κ·lr·grad``, with the
    κ adapted so far and the lr the scheduler set.
    """
    alr_params = make_params(SHAPES[:-1])
    torch_params = clone_params(alr_params)
    opt = alr.ALROptimizer(
        alr_params, lr=0.05, algorithm="sgd", hypergrad="mult", hypergrad_lr=0.1, backend="reference"
    )
    ref = torch.optim.SGD(torch_params, lr=0.05)
    scheduler = lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    torch_scheduler = lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)

    for step in range(STEPS):
        set_grads([alr_params, torch_params], step)
        stats = opt.stats()
        lr = opt.param_groups[0]["lr"]
        assert torch.equal(stats.effective_lr[0], stats.kappa[0] * lr)
        before = [p.detach().clone() for p in alr_params]
        opt.step()
        ref.step()
        for index, (p, old, rate) in enumerate(zip(alr_params, before, stats.effective_lr[0])):
            assert_tensors_close(p.detach(), old - rate * p.grad, f"step {step}: params[{index}]")
        scheduler.step()
        torch_scheduler.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == scheduler.get_last_lr()[0]

    assert bool((opt.stats().kappa[0] != 1).all()), "kappa never adapted"
    assert opt.param_groups[0]["lr"] == 0.05 * 0.5 ** (STEPS // 3)
