"""PNG charts of the results: speedup against torch, and GB/s against the roofline.

One panel per workload; along x the (algorithm, variant) groups, one bar per
implementation. matplotlib is imported here only, with the non-interactive Agg backend,
so the benchmark never needs a display.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .runner import Row

__all__ = ["write_charts"]


def write_charts(rows: list[Row], out: Path) -> list[Path]:
    """Write ``speedup.png`` and ``bandwidth.png`` into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    ok = [row for row in rows if row.status == "ok"]
    paths = [out / "speedup.png", out / "bandwidth.png"]
    _grouped_bars(
        ok,
        paths[0],
        value=lambda row: row.speedup,
        ylabel="speedup vs fastest torch (×, log)",
        title="Step time: speedup vs the fastest torch implementation\n(hypergrad, defaults: vs the plain torch step)",
        log=True,
        reference=lambda group: 1.0,
    )
    roofline = {row.group: row.roofline_gbps for row in ok}
    _grouped_bars(
        ok,
        paths[1],
        value=lambda row: row.gbps,
        ylabel="GB/s (bytes model / median, log)",
        title="Achieved bandwidth; black line: same-run memory roofline",
        log=True,
        reference=lambda group: roofline.get(group),
    )
    return paths


def _grouped_bars(
    rows: list[Row],
    path: Path,
    value: Callable[[Row], float | None],
    ylabel: str,
    title: str,
    log: bool,
    reference: Callable[[tuple[str, str, str]], float | None],
) -> None:
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(row.workload for row in rows))
    impls = list(dict.fromkeys(row.impl for row in rows))
    colors = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(
        len(workloads) or 1, 1, figsize=(12, 3.6 * max(1, len(workloads))), squeeze=False
    )
    width = 0.8 / max(1, len(impls))
    for ax, workload in zip(axes[:, 0], workloads):
        groups = list(dict.fromkeys(row.group for row in rows if row.workload == workload))
        for x, group in enumerate(groups):
            for i, impl in enumerate(impls):
                row = next((r for r in rows if r.group == group and r.impl == impl), None)
                height = None if row is None else value(row)
                if height is not None and height > 0:
                    ax.bar(x - 0.4 + (i + 0.5) * width, height, width, color=colors[impl])
            level = reference(group)
            if level is not None:
                ax.hlines(level, x - 0.45, x + 0.45, colors="black", linewidth=1.5)
        ax.set_xticks(range(len(groups)), [f"{algorithm}\n{variant}" for _, algorithm, variant in groups])
        ax.set_title(workload, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[impl]) for impl in impls]
    fig.legend(handles, impls, loc="upper right", fontsize=8, ncol=min(len(impls), 4))
    fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
