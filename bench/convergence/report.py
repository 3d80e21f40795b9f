"""The sweep's record, ``results.json``, and its human-readable view, ``summary.md``.

``results.json`` is the single source of truth: the markdown summary and the plots are
rendered from it alone, so ``--render DIR`` can redo them without rerunning anything. It
holds no inf or nan: a number that is not finite is written as null (a diverged run's
loss or perplexity, an unreached loss target). Traces (EMA training loss and median κ) keep
about :data:`TRACE_POINTS` evenly spaced steps plus the last one.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .metrics import VariantSummary
from .train import EMA_DECAY, RunResult
from .variants import Variant

TRACE_POINTS = 100

Payload = dict[str, Any]
"""The parsed content of ``results.json``."""


@dataclass
class SweepInfo:
    """Everything about a sweep that is not a run's numbers.

    Attributes:
        tasks: task name → description, metric, steps, batch size and parameter count.
        resolved: variant name → algorithm → the ALR settings the optimizer ran with.
        wall_s: wall-clock seconds of all the runs (on ``workers`` processes).
    """

    command: str
    started: str
    versions: dict[str, str]
    workers: int
    tasks: dict[str, dict[str, Any]]
    variants: list[Variant]
    resolved: dict[str, dict[str, dict[str, Any]]]
    lrs: dict[str, list[float]]
    seeds: list[int]
    wall_s: float


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None; floats keep 6 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _trace_steps(length: int) -> list[int]:
    """About :data:`TRACE_POINTS` 1-based steps, evenly spaced, always including the last."""
    if length == 0:
        return []
    stride = max(1, length // TRACE_POINTS)
    steps = list(range(stride, length + 1, stride))
    return steps if steps[-1] == length else [*steps, length]


def run_record(result: RunResult, steps_to_target: int | None) -> dict[str, Any]:
    """One run as a JSON object (fields as in :class:`bench.convergence.train.RunResult`).

    ALR runs add ``kappa_final``, ``kappa_peak`` and ``kappa_low`` (the last, largest and
    smallest median κ), ``kappa_steps_at_max``/``_min`` (steps that ended with κ at a bound)
    and ``kappa_trace``.
    """
    spec = result.spec
    steps = _trace_steps(result.steps_done)
    record: dict[str, Any] = {
        "task": spec.task,
        "algorithm": spec.algorithm,
        "variant": spec.variant.name,
        "lr": spec.lr,
        "seed": spec.seed,
        "steps": result.steps,
        "steps_done": result.steps_done,
        "diverged": result.diverged,
        "nonfinite_steps": result.nonfinite_steps,
        "skipped_steps": result.skipped_steps,
        "final_train_loss": result.train_loss,
        "final_train_loss_ema": result.final_loss_ema,
        "heldout_loss": result.heldout_loss,
        "heldout_accuracy": result.heldout_accuracy,
        "heldout_perplexity": result.heldout_perplexity,
        "steps_to_target": steps_to_target,
        "wall_s": result.wall_s,
        "ms_per_step": 1e3 * result.wall_s / max(result.steps_done, 1),
        "trace_steps": steps,
        "loss_ema_trace": [result.loss_ema[s - 1] for s in steps],
    }
    if result.kappa:
        low, high = result.kappa_bounds or (math.nan, math.nan)
        record.update(
            kappa_final=result.kappa[-1],
            kappa_peak=max(result.kappa),
            kappa_low=min(result.kappa),
            # Does the bound, not the rule, decide where κ ends up?
            kappa_steps_at_max=sum(k >= high * (1 - 1e-6) for k in result.kappa),
            kappa_steps_at_min=sum(k <= low * (1 + 1e-6) for k in result.kappa),
            kappa_trace=[result.kappa[s - 1] for s in steps],
        )
    return record


def build_payload(info: SweepInfo, results: Sequence[RunResult], summaries: Sequence[VariantSummary]) -> Payload:
    """Every run and every summary, JSON-safe."""
    payload = {
        "meta": {
            "command": info.command,
            "started": info.started,
            "versions": info.versions,
            "workers": info.workers,
            "wall_s": info.wall_s,
            "compute_s": sum(r.wall_s for r in results),
            "runs": len(results),
            "ema_decay": EMA_DECAY,
            "accuracy_tolerance_points": metrics.ACCURACY_TOLERANCE,
            "perplexity_tolerance": metrics.PERPLEXITY_TOLERANCE,
            "loss_target_factor": metrics.LOSS_TARGET_FACTOR,
            "robust_range_counting": "grid points passing, contiguous or not, × grid spacing (decades)",
        },
        "tasks": info.tasks,
        "variants": {
            v.name: {"options": v.options, "baseline": v.baseline, "resolved": info.resolved[v.name]}
            for v in info.variants
        },
        "lrs": info.lrs,
        "seeds": info.seeds,
        "summary": [asdict(s) for s in summaries],
        "runs": [run_record(r, metrics.run_steps_to_target(r, summaries)) for r in results],
    }
    return _clean(payload)


def write_json(path: Path, payload: Payload) -> None:
    path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Payload:
    return json.loads(path.read_text(encoding="utf-8"))


def fmt_metric(metric_name: str, value: float | None) -> str:
    """A held-out metric; None is a diverged (non-finite) one."""
    if value is None:
        return "div."
    return f"{value:.1f}" if metrics.higher_is_better(metric_name) else f"{value:.2f}"


def fmt_delta(metric_name: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:+.1f}" if metrics.higher_is_better(metric_name) else f"{value:+.1f}%"


def fmt_num(value: float | None, missing: str = "–") -> str:
    return missing if value is None else f"{value:.3g}"


def fmt_lr(value: float | None) -> str:
    return "–" if value is None else f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")


def fmt_range(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def settings_text(settings: dict[str, Any]) -> str:
    """ALR settings in one line, e.g. ``mult β=0.02 ρ=0.99 group one-pass κ∈[0.001, 100]``."""
    if settings["hypergrad"] == "off":
        return "off (torch)"
    exact = "exact" if settings["hypergrad_exact"] else "one-pass"
    # Older results.json files predate ρ; the add rule does not use it.
    rho = settings.get("hypergrad_norm_decay")
    rho = f" ρ={rho:g}" if rho is not None and settings["hypergrad"] == "mult" else ""
    return (
        f"{settings['hypergrad']} β={settings['hypergrad_lr']:g}{rho} {settings['hypergrad_scope']} {exact} "
        f"κ∈[{settings['kappa_min']:g}, {settings['kappa_max']:g}]"
    )


def _setup_section(payload: Payload) -> list[str]:
    lines = ["## Setup", ""]
    for name, task in payload["tasks"].items():
        lines.append(f"- **{name}**: {task['description']} ({task['params']:,} parameters).")
    for algorithm, lrs in payload["lrs"].items():
        lines.append(f"- {algorithm} initial lrs: {', '.join(fmt_lr(lr) for lr in lrs)}.")
    lines += [
        (
            f"- Seeds {', '.join(map(str, payload['seeds']))}: each seed fixes the initial weights and "
            "the data order, identical across variants and lrs. SGD uses momentum 0.9; AdamW its "
            "default weight decay 1e-2."
        ),
        "",
    ]
    rows = [
        [name, algorithm, settings_text(settings)]
        for name, variant in payload["variants"].items()
        for algorithm, settings in variant["resolved"].items()
    ]
    return lines + _table(["variant", "algorithm", "settings"], rows) + [""]


METRICS_TEXT = """## Metrics

Medians over seeds at each initial lr. The reference is the same algorithm's baseline (alr's
drop-in with the adaptation off = torch.optim) at its best lr.

- **robust range**: decades of initial lr whose median held-out accuracy is within 1 point
  of the best baseline's (perplexity within 5%): the number of grid points that pass,
  **contiguous or not**, × the grid spacing (0.5 decades on the half-decade grid).
  *contig.* counts only the longest contiguous run.
- **at base-best lr**: the variant's median held-out metric at the baseline's best lr; Δ is
  against the best baseline (accuracy points; perplexity %, positive = worse).
- **worst Δ**: the largest loss against the baseline at the same lr anywhere on the grid.
- **steps to target**: first step whose EMA training loss (decay 0.98) is ≤ 1.1 × the
  baseline's lowest median final EMA training loss; ">N" = not reached in N steps.
- **final train loss**: cross-entropy over the whole training split (LM: 20,000 evenly
  spaced training windows) after the last step.
"""

SUMMARY_HEADER = [
    "task",
    "algorithm",
    "variant",
    "robust range (dec)",
    "contig.",
    "baseline range",
    "best baseline (lr)",
    "at base-best lr",
    "Δ",
    "worst Δ (lr)",
    "variant best (lr)",
]


def summary_row(s: dict[str, Any]) -> list[str]:
    """One row of the compact table; the baseline has no Δ against itself."""
    m = s["metric_name"]
    own = s["variant"] == "baseline"
    worst = "–" if own else f"{fmt_delta(m, s['worst_delta'])} ({fmt_lr(s['worst_delta_lr'])})"
    best_baseline = "–"
    if s["baseline_best_lr"] is not None:
        best_baseline = f"{fmt_metric(m, s['baseline_best_metric'])} ({fmt_lr(s['baseline_best_lr'])})"
    return [
        s["task"],
        s["algorithm"],
        s["variant"],
        fmt_range(s["robust_range"]),
        fmt_range(s["robust_range_contiguous"]),
        fmt_range(s["baseline_robust_range"]),
        best_baseline,
        "–" if own or s["baseline_best_lr"] is None else fmt_metric(m, s["metric_at_baseline_best_lr"]),
        "–" if own else fmt_delta(m, s["delta_at_baseline_best_lr"]),
        worst,
        f"{fmt_metric(m, s['best_metric'])} ({fmt_lr(s['best_lr'])})",
    ]


def _cost_section(payload: Payload) -> list[str]:
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in payload["runs"]:
        if not r["diverged"]:
            runs[(r["variant"], r["task"])].append(r)
    tasks = list(payload["tasks"])
    rows = []
    for variant in payload["variants"]:
        row = [variant]
        for task in tasks:
            done = runs.get((variant, task), [])
            if not done:
                row.append("–")
                continue
            seconds = float(np.median([r["wall_s"] for r in done]))
            per_step = float(np.median([r["ms_per_step"] for r in done]))
            row.append(f"{seconds:.2f} s ({per_step:.2f} ms/step)")
        rows.append(row)
    meta = payload["meta"]
    lines = [
        "## Cost",
        "",
        (
            f"{len(payload['runs'])} runs; wall clock {meta['wall_s']:.0f} s on {meta['workers']} worker "
            f"process(es); compute {meta['compute_s']:.0f} s (the sum of the runs' wall times, one "
            "thread each; other load on the machine inflates it). Median per run that did not "
            "diverge, training and final evaluation:"
        ),
        "",
    ]
    return lines + _table(["variant", *tasks], rows) + [""]


def _lr_table(title: str, group: Sequence[dict[str, Any]], cell_text: Callable[[dict[str, Any]], str]) -> list[str]:
    lrs = sorted({c["lr"] for s in group for c in s["cells"]})
    rows = []
    for s in group:
        cells = {c["lr"]: c for c in s["cells"]}
        rows.append([s["variant"]] + [cell_text(cells[lr]) if lr in cells else "" for lr in lrs])
    if not rows:
        return []
    return [f"**{title}**", ""] + _table(["variant \\ initial lr", *map(fmt_lr, lrs)], rows) + [""]


def _task_section(group: Sequence[dict[str, Any]], steps: int) -> list[str]:
    """The per-lr tables of one (task, algorithm)."""
    first = group[0]
    m, target = first["metric_name"], first["loss_target"]
    label = "held-out accuracy %" if m == "accuracy" else "held-out perplexity"
    adaptive = [s for s in group if any(c["kappa_final"] is not None for c in s["cells"])]

    def reached(c: dict[str, Any]) -> str:
        if target is None:
            return "–"
        return f">{steps}" if c["steps_to_target"] is None else f"{c['steps_to_target']:.0f}"

    lines = [f"## {first['task']} · {first['algorithm']}", ""]
    lines += _lr_table(
        f"Median {label} (* = within the robust tolerance of the best baseline)",
        group,
        lambda c: fmt_metric(m, c["metric"]) + ("*" if c["robust"] else ""),
    )
    lines += _lr_table("Median final train loss", group, lambda c: fmt_num(c["train_loss"], "div."))
    lines += _lr_table(f"Median steps to the loss target L* = {fmt_num(target)}", group, reached)
    lines += _lr_table(
        "Median final κ (peak κ)",
        adaptive,
        lambda c: f"{fmt_num(c['kappa_final'])} ({fmt_num(c['kappa_peak'])})",
    )
    return lines


def markdown(payload: Payload) -> str:
    """The human-readable summary: setup, the compact table, cost, per-lr tables."""
    meta = payload["meta"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for s in payload["summary"]:
        groups[(s["task"], s["algorithm"])].append(s)
    lines = [
        "# ALR convergence sweep",
        "",
        f"`{meta['command']}` — started {meta['started']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        *_setup_section(payload),
        METRICS_TEXT,
        "## Summary",
        "",
        *_table(SUMMARY_HEADER, [summary_row(s) for s in payload["summary"]]),
        "",
        *_cost_section(payload),
    ]
    for (task, _), group in groups.items():
        lines += _task_section(group, payload["tasks"][task]["steps"])
    return "\n".join(lines).rstrip() + "\n"
