"""One training run: a task, an optimizer variant, an initial lr and a seed.

A run records every step's minibatch loss (as an EMA) and, for ALR, the median κ over the
parameters, then evaluates the final model. It stops early once training cannot continue:
a parameter is not finite (a baseline step with a nan gradient), or the loss has not been
finite for :data:`STUCK_STEPS` steps in a row (ALR skips such steps, leaving the model as
it was, so the remaining steps could only repeat them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .tasks import get_task
from .variants import Variant, make_optimizer

EMA_DECAY = 0.98
"""Smoothing of the minibatch training loss (about a 50-step window, 2 digits epochs)."""

STUCK_STEPS = 20


@dataclass(frozen=True)
class RunSpec:
    """What to run; a run is a deterministic function of its spec."""

    task: str
    algorithm: str
    variant: Variant
    lr: float
    seed: int
    tiny: bool = False


@dataclass
class RunResult:
    """The numbers of one run.

    Attributes:
        steps_done: optimizer steps taken (fewer than ``steps`` when stopped early).
        diverged: stopped early, or the final held-out loss is not finite.
        nonfinite_steps: steps whose minibatch loss was inf or nan.
        skipped_steps: steps ALR skipped for nonfinite gradients (0 for the baseline).
        loss_ema: bias-corrected EMA (decay :data:`EMA_DECAY`) of the finite minibatch
            losses after each step taken; nonfinite losses leave it unchanged.
        kappa: ALR only: the median κ over the parameters after each step taken (the κ
            the next step uses); empty for the baseline (κ ≡ 1).
        kappa_bounds: ``(κ_min, κ_max)`` as the optimizer resolved them; None for the baseline.
        train_loss, heldout_loss, heldout_accuracy, heldout_perplexity: see
            :class:`bench.convergence.tasks.Evaluation`.
        wall_s: seconds for training and evaluation on one thread.
    """

    spec: RunSpec
    steps: int
    steps_done: int
    diverged: bool
    nonfinite_steps: int
    skipped_steps: int
    train_loss: float
    heldout_loss: float
    heldout_accuracy: float | None
    heldout_perplexity: float | None
    wall_s: float
    loss_ema: list[float] = field(repr=False)
    kappa: list[float] = field(repr=False)
    kappa_bounds: tuple[float, float] | None = None

    @property
    def heldout_metric(self) -> float:
        """Accuracy (%) for the digits tasks, perplexity for the language model."""
        value = self.heldout_perplexity if self.heldout_accuracy is None else self.heldout_accuracy
        return math.nan if value is None else value

    @property
    def final_loss_ema(self) -> float:
        """The EMA training loss after the last step; nan if the run diverged."""
        return self.loss_ema[-1] if self.loss_ema and not self.diverged else math.nan


class LossEMA:
    """Bias-corrected exponential moving average of the finite values it is fed."""

    def __init__(self, decay: float = EMA_DECAY) -> None:
        self.decay, self.mean, self.weight = decay, 0.0, 0.0

    def update(self, value: float) -> float:
        if math.isfinite(value):
            self.mean = self.decay * self.mean + (1 - self.decay) * value
            self.weight = self.decay * self.weight + (1 - self.decay)
        return self.mean / self.weight if self.weight else math.nan


def _median_kappa(opt: torch.optim.Optimizer) -> float:
    return torch.cat(opt.stats().kappa).float().quantile(0.5).item()


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run(spec: RunSpec) -> RunResult:
    """Train and evaluate; deterministic given ``spec`` (run it on one thread)."""
    task = get_task(spec.task, spec.tiny)
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    model = task.build_model()
    opt = make_optimizer(spec.variant, spec.algorithm, list(model.parameters()), spec.lr)
    group = opt.param_groups[0]
    adapts = group["hypergrad"] != "off"
    ema, loss_ema, kappa = LossEMA(), [], []
    nonfinite = stuck = 0
    stopped = False
    for x, y in task.batches(spec.seed):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y)
        loss.backward()
        opt.step()
        value = loss.item()
        loss_ema.append(ema.update(value))
        if adapts:
            kappa.append(_median_kappa(opt))
        stuck = 0 if math.isfinite(value) else stuck + 1
        nonfinite += stuck > 0
        if stuck and (stuck >= STUCK_STEPS or not _params_finite(model)):
            stopped = True
            break
    evaluation = task.evaluate(model)
    return RunResult(
        spec=spec,
        steps=task.size.steps,
        steps_done=len(loss_ema),
        diverged=stopped or not math.isfinite(evaluation.heldout_loss),
        nonfinite_steps=nonfinite,
        skipped_steps=int(opt.stats().skipped_steps),
        train_loss=evaluation.train_loss,
        heldout_loss=evaluation.heldout_loss,
        heldout_accuracy=evaluation.heldout_accuracy,
        heldout_perplexity=evaluation.heldout_perplexity,
        wall_s=time.perf_counter() - start,
        loss_ema=loss_ema,
        kappa=kappa,
        kappa_bounds=(group["kappa_min"], group["kappa_max"]) if adapts else None,
    )
