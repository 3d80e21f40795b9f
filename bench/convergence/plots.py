"""PNG plots rendered from ``results.json`` (matplotlib's Agg backend: no display needed).

* ``sensitivity-<task>-<algorithm>.png``: held-out metric and final train loss against the
  initial lr, one line per variant (median over seeds; the band spans the seeds), with the
  robust-range tolerance of the best baseline.
* ``kappa-<task>-<algorithm>.png``: one panel per adapting variant: the median over seeds
  of the median κ over the parameters against the step, for up to :data:`KAPPA_LINES`
  initial lrs spread over the grid.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogFormatter, NullFormatter

from .metrics import ACCURACY_TOLERANCE, PERPLEXITY_TOLERANCE, higher_is_better

KAPPA_LINES = 5
"""Initial lrs per κ panel: the lowest, the highest and evenly spaced ones between."""
DPI = 100


def _values(values: Sequence[float | None]) -> np.ndarray:
    """JSON numbers as floats, null (not finite: diverged) as nan so it is not drawn."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _plain_log_ticks(ax: plt.Axes) -> None:
    """Plain-text labels on a log y axis, minor ticks included when it spans few decades
    (the default mathtext labels are the slowest part of drawing); none on minor lr ticks."""
    ax.xaxis.set_minor_formatter(NullFormatter())
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))


def _style(variant: str) -> dict[str, Any]:
    if variant == "baseline":
        return {"color": "black", "linewidth": 2.2, "zorder": 3}
    return {"linewidth": 1.3}


def _plot_variant(ax_metric: plt.Axes, ax_loss: plt.Axes, s: dict[str, Any]) -> None:
    """One variant's medians, and the min–max band over seeds of its held-out metric."""
    cells = s["cells"]
    lrs = [c["lr"] for c in cells]
    style = _style(s["variant"])
    line = ax_metric.plot(lrs, _values([c["metric"] for c in cells]), marker="o", ms=3, label=s["variant"], **style)
    seeds = np.stack([_values(c["metric_per_seed"]) for c in cells])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an lr where every seed diverged
        low, high = np.nanmin(seeds, axis=1), np.nanmax(seeds, axis=1)
    ax_metric.fill_between(lrs, low, high, color=line[0].get_color(), alpha=0.12)
    ax_loss.plot(lrs, _values([c["train_loss"] for c in cells]), marker="o", ms=3, label=s["variant"], **style)


def sensitivity_plot(path: Path, group: Sequence[dict[str, Any]]) -> None:
    """Held-out metric and final train loss against the initial lr (log x)."""
    first = group[0]
    metric = first["metric_name"]
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in group:
        _plot_variant(ax_metric, ax_loss, s)
    best = first["baseline_best_metric"]
    if best is not None:
        tolerance = best - ACCURACY_TOLERANCE if higher_is_better(metric) else best * (1 + PERPLEXITY_TOLERANCE)
        ax_metric.axhline(tolerance, color="grey", linestyle="--", linewidth=1, label="robust tolerance")
    if higher_is_better(metric):
        ax_metric.set_ylabel("held-out accuracy (%)")
    else:
        ax_metric.set_yscale("log")
        ax_metric.set_ylabel("held-out perplexity")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("final train loss")
    for ax in (ax_metric, ax_loss):
        _plain_log_ticks(ax)
    for ax in (ax_metric, ax_loss):
        ax.set_xscale("log")
        ax.set_xlabel("initial lr")
        ax.grid(True, which="both", alpha=0.3)
    ax_metric.legend(fontsize=7, loc="best")
    fig.suptitle(f"{first['task']} · {first['algorithm']}: median over seeds (band: min–max)")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.9, wspace=0.22)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _pick_lrs(lrs: Sequence[float]) -> list[float]:
    ordered = sorted(lrs)
    if len(ordered) <= KAPPA_LINES:
        return ordered
    index = np.linspace(0, len(ordered) - 1, KAPPA_LINES).round().astype(int)
    return [ordered[i] for i in dict.fromkeys(index)]


def _median_trace(runs: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, median κ over seeds); a run that stopped early is missing from later steps."""
    steps = sorted({s for r in runs for s in r["trace_steps"]})
    column = {s: i for i, s in enumerate(steps)}
    traces = np.full((len(runs), len(steps)), np.nan)
    for i, r in enumerate(runs):
        for s, k in zip(r["trace_steps"], r["kappa_trace"]):
            traces[i, column[s]] = np.nan if k is None else k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.array(steps), np.nanmedian(traces, axis=0)


def kappa_plot(path: Path, runs: Sequence[dict[str, Any]]) -> bool:
    """κ over steps per adapting variant; returns False (and writes nothing) if none adapts."""
    by_variant: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if "kappa_trace" in r:
            by_variant[r["variant"]][r["lr"]].append(r)
    if not by_variant:
        return False
    columns = min(3, len(by_variant))
    rows = math.ceil(len(by_variant) / columns)
    width, height = 4.6 * columns, 3.4 * rows + 0.4
    fig, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False)
    for ax, (variant, by_lr) in zip(axes.flat, by_variant.items()):
        for lr in _pick_lrs(list(by_lr)):
            ax.plot(*_median_trace(by_lr[lr]), label=f"lr {lr:.0e}", linewidth=1.2)
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("median κ")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(by_variant) :]:
        ax.axis("off")
    fig.suptitle(f"{runs[0]['task']} · {runs[0]['algorithm']}: κ over steps (median over seeds)")
    # Margins in inches, so that titles and labels fit whatever the number of panels.
    fig.subplots_adjust(
        left=0.75 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.8 / height, wspace=0.3, hspace=0.5
    )
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def write_plots(out: Path, payload: dict[str, Any]) -> list[Path]:
    """Every PNG of the sweep; returns the paths written."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for s in payload["summary"]:
        groups[(s["task"], s["algorithm"])].append(s)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in payload["runs"]:
        runs[(r["task"], r["algorithm"])].append(r)
    written = []
    for (task, algorithm), group in groups.items():
        path = out / f"sensitivity-{task}-{algorithm}.png"
        sensitivity_plot(path, group)
        written.append(path)
        path = out / f"kappa-{task}-{algorithm}.png"
        if kappa_plot(path, runs[(task, algorithm)]):
            written.append(path)
    return written
