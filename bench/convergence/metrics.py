"""Metrics of a sweep, aggregated over seeds (always the median) per initial lr.

For each task and algorithm the reference is that algorithm's **baseline** (torch-identical,
adaptation off), and its **best** held-out metric over the lr grid, where each lr's value is
the median over seeds:

* **Held-out metric**: accuracy in % (digits) or perplexity (LM) of the final model.
* **Robust range** (decades): the number of grid lrs whose median held-out accuracy is
  within 1 percentage point of the best baseline's (``acc ≥ best − 1``), or whose median
  perplexity is within 5% of it (``ppl ≤ 1.05 · best``), times the grid spacing in decades
  (0.5 on the default half-decade grid). Points are counted **contiguous or not**; the
  longest contiguous run is reported as well (``robust_range_contiguous``).
* **Δ at the baseline's best lr**: the variant's median held-out metric at the lr where the
  baseline is best, minus the best baseline's: in points of accuracy, or in % of perplexity
  (``100·(ppl/ppl_best − 1)``, positive = worse).
* **Worst Δ**: over the grid, the largest loss of the variant against the baseline *at the
  same lr* (median against median), in the same units: the most negative accuracy Δ, or the
  most positive perplexity Δ. Where both diverged (perplexity inf) Δ is 0.
* **Loss target** ``L* = 1.1 ×`` the lowest median final EMA training loss of the baseline
  over the grid; **steps to target** of a run: the first step (1-based) at which its EMA
  training loss is ≤ ``L*``, None if never (Baydin et al.'s iterations-to-threshold table).
* **κ**: the median over the parameters of κ after each step; per lr, the median over seeds
  of its final value and of its largest value.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .train import RunResult

ACCURACY_TOLERANCE = 1.0
"""Percentage points of held-out accuracy below the best baseline still counted robust."""
PERPLEXITY_TOLERANCE = 0.05
"""Relative perplexity above the best baseline still counted robust."""
LOSS_TARGET_FACTOR = 1.1


@dataclass
class LrCell:
    """One variant at one initial lr, over seeds (medians unless stated).

    Attributes:
        metric: median held-out metric (accuracy % or perplexity; inf = diverged LM).
        metric_per_seed: the held-out metric of each seed, in seed order.
        train_loss: median final training loss (full evaluation; inf = diverged).
        loss_ema: median final EMA training loss (inf = diverged).
        steps_to_target: median steps to the loss target (inf = not reached by the median
            seed); None when no target exists (no baseline in the sweep).
        kappa_final, kappa_peak: median final and largest κ; None for the baseline.
        diverged: number of seeds that diverged.
        robust: whether the median metric is within tolerance of the best baseline's.
    """

    lr: float
    metric: float
    metric_per_seed: list[float]
    train_loss: float
    loss_ema: float
    steps_to_target: float | None
    kappa_final: float | None
    kappa_peak: float | None
    diverged: int
    robust: bool | None


@dataclass
class Reference:
    """The baseline's numbers that every variant of a (task, algorithm) is measured against."""

    best_metric: float
    best_lr: float
    threshold: float
    loss_target: float
    metric_by_lr: dict[float, float]


@dataclass
class VariantSummary:
    """One (task, algorithm, variant): its per-lr cells and the metrics of the module docstring.

    The fields that compare with the baseline are None when the sweep has no baseline.
    """

    task: str
    algorithm: str
    variant: str
    metric_name: str
    cells: list[LrCell]
    best_metric: float
    best_lr: float
    baseline_best_metric: float | None
    baseline_best_lr: float | None
    robust_range: float | None
    robust_range_contiguous: float | None
    baseline_robust_range: float | None
    metric_at_baseline_best_lr: float | None
    delta_at_baseline_best_lr: float | None
    worst_delta: float | None
    worst_delta_lr: float | None
    loss_target: float | None


def _finite_or(value: float | None, fallback: float) -> float:
    return value if value is not None and math.isfinite(value) else fallback


def _metric(result: RunResult) -> float:
    """Held-out metric with a diverged LM's perplexity as inf (accuracy is always finite)."""
    return _finite_or(result.heldout_metric, math.inf)


def higher_is_better(metric_name: str) -> bool:
    return metric_name == "accuracy"


def delta(metric_name: str, value: float, reference: float) -> float:
    """Variant minus reference: points of accuracy, or % of perplexity (positive = worse)."""
    if higher_is_better(metric_name):
        return value - reference
    if math.isinf(value) and math.isinf(reference):
        return 0.0
    return 100.0 * (value / reference - 1.0)


def steps_to_target(loss_ema: Sequence[float], target: float) -> int | None:
    """First step (1-based) whose EMA training loss is ≤ ``target``; None if none."""
    for step, value in enumerate(loss_ema, start=1):
        if value <= target:
            return step
    return None


def grid_spacing(lrs: Sequence[float]) -> float:
    """Decades between neighbouring grid points (0.5 when there is a single point)."""
    if len(lrs) < 2:
        return 0.5
    return float(np.median(np.diff(np.log10(sorted(lrs)))))


def _longest_run(flags: Sequence[bool]) -> int:
    best = current = 0
    for flag in flags:
        current = current + 1 if flag else 0
        best = max(best, current)
    return best


def _by_cell(results: Sequence[RunResult]) -> dict[tuple[str, str, str], dict[float, list[RunResult]]]:
    cells: dict[tuple[str, str, str], dict[float, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        cells[(r.spec.task, r.spec.algorithm, r.spec.variant.name)][r.spec.lr].append(r)
    for by_lr in cells.values():
        for runs in by_lr.values():
            runs.sort(key=lambda r: r.spec.seed)
    return cells


def _median(values: Sequence[float]) -> float:
    return float(np.median(values))


def _best(metric_name: str, by_lr: dict[float, float]) -> tuple[float, float]:
    """(best median metric, its lr); ties go to the smaller lr."""
    pick = max if higher_is_better(metric_name) else min
    lr = pick(sorted(by_lr), key=lambda lr: by_lr[lr])
    return by_lr[lr], lr


def _reference(metric_name: str, by_lr: dict[float, list[RunResult]]) -> Reference:
    metric_by_lr = {lr: _median([_metric(r) for r in runs]) for lr, runs in by_lr.items()}
    best, best_lr = _best(metric_name, metric_by_lr)
    if higher_is_better(metric_name):
        threshold = best - ACCURACY_TOLERANCE
    else:
        threshold = best * (1.0 + PERPLEXITY_TOLERANCE)
    final_ema = [_median([_finite_or(r.final_loss_ema, math.inf) for r in runs]) for runs in by_lr.values()]
    return Reference(best, best_lr, threshold, LOSS_TARGET_FACTOR * min(final_ema), metric_by_lr)


def _is_robust(metric_name: str, value: float, reference: Reference) -> bool:
    if higher_is_better(metric_name):
        return value >= reference.threshold
    return value <= reference.threshold


def _cell(metric_name: str, lr: float, runs: list[RunResult], reference: Reference | None) -> LrCell:
    metric = _median([_metric(r) for r in runs])
    steps = None
    if reference is not None:
        reached = [steps_to_target(r.loss_ema, reference.loss_target) for r in runs]
        steps = _median([math.inf if s is None else s for s in reached])
    adapts = all(r.kappa for r in runs)
    return LrCell(
        lr=lr,
        metric=metric,
        metric_per_seed=[_metric(r) for r in runs],
        train_loss=_median([_finite_or(r.train_loss, math.inf) for r in runs]),
        loss_ema=_median([_finite_or(r.final_loss_ema, math.inf) for r in runs]),
        steps_to_target=steps,
        kappa_final=_median([r.kappa[-1] for r in runs]) if adapts else None,
        kappa_peak=_median([max(r.kappa) for r in runs]) if adapts else None,
        diverged=sum(r.diverged for r in runs),
        robust=None if reference is None else _is_robust(metric_name, metric, reference),
    )


def _robust_ranges(cells: list[LrCell], spacing: float) -> tuple[float | None, float | None]:
    if any(c.robust is None for c in cells):
        return None, None
    flags = [bool(c.robust) for c in cells]
    return spacing * sum(flags), spacing * _longest_run(flags)


def _summary(
    key: tuple[str, str, str],
    metric_name: str,
    by_lr: dict[float, list[RunResult]],
    reference: Reference | None,
    baseline_range: float | None,
) -> VariantSummary:
    task, algorithm, variant = key
    lrs = sorted(by_lr)
    cells = [_cell(metric_name, lr, by_lr[lr], reference) for lr in lrs]
    best, best_lr = _best(metric_name, {c.lr: c.metric for c in cells})
    robust, contiguous = _robust_ranges(cells, grid_spacing(lrs))
    summary = VariantSummary(
        task=task,
        algorithm=algorithm,
        variant=variant,
        metric_name=metric_name,
        cells=cells,
        best_metric=best,
        best_lr=best_lr,
        baseline_best_metric=None,
        baseline_best_lr=None,
        robust_range=robust,
        robust_range_contiguous=contiguous,
        baseline_robust_range=baseline_range,
        metric_at_baseline_best_lr=None,
        delta_at_baseline_best_lr=None,
        worst_delta=None,
        worst_delta_lr=None,
        loss_target=None if reference is None else reference.loss_target,
    )
    if reference is not None:
        _compare(summary, reference)
    return summary


def _compare(summary: VariantSummary, reference: Reference) -> None:
    """Fill in the fields measured against the baseline."""
    name = summary.metric_name
    by_lr = {c.lr: c.metric for c in summary.cells}
    summary.baseline_best_metric, summary.baseline_best_lr = reference.best_metric, reference.best_lr
    if reference.best_lr in by_lr:
        summary.metric_at_baseline_best_lr = by_lr[reference.best_lr]
        summary.delta_at_baseline_best_lr = delta(name, by_lr[reference.best_lr], reference.best_metric)
    shared = [lr for lr in by_lr if lr in reference.metric_by_lr]
    deltas = {lr: delta(name, by_lr[lr], reference.metric_by_lr[lr]) for lr in shared}
    if deltas:
        # The worst is the largest harm: the lowest accuracy Δ, the highest perplexity Δ.
        pick = min if higher_is_better(name) else max
        summary.worst_delta_lr = pick(sorted(deltas), key=lambda lr: deltas[lr])
        summary.worst_delta = deltas[summary.worst_delta_lr]


def summarise(results: Sequence[RunResult], metric_names: dict[str, str]) -> list[VariantSummary]:
    """A :class:`VariantSummary` per (task, algorithm, variant), in the order of ``results``.

    Args:
        metric_names: task name → ``"accuracy"`` or ``"perplexity"``.
    """
    cells = _by_cell(results)
    references: dict[tuple[str, str], Reference] = {}
    baseline_ranges: dict[tuple[str, str], float | None] = {}
    for (task, algorithm, variant), by_lr in cells.items():
        if variant == "baseline":
            reference = _reference(metric_names[task], by_lr)
            references[(task, algorithm)] = reference
            baseline = _summary((task, algorithm, variant), metric_names[task], by_lr, reference, None)
            baseline_ranges[(task, algorithm)] = baseline.robust_range
    summaries = []
    for key, by_lr in cells.items():
        task, algorithm, _ = key
        reference = references.get((task, algorithm))
        summaries.append(_summary(key, metric_names[task], by_lr, reference, baseline_ranges.get((task, algorithm))))
    return summaries


def run_steps_to_target(result: RunResult, summaries: Sequence[VariantSummary]) -> int | None:
    """Steps to its (task, algorithm)'s loss target of one run; None if unreached or no target."""
    for s in summaries:
        if (s.task, s.algorithm) == (result.spec.task, result.spec.algorithm) and s.loss_target is not None:
            return steps_to_target(result.loss_ema, s.loss_target)
    return None
