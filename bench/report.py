"""The benchmark's outputs: a markdown table for stdout and a JSON file with every figure."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .implementations import PLAIN_BASELINE_VARIANTS
from .roofline import Roofline
from .runner import Row

__all__ = ["markdown", "write_json"]

TABLE_HEADER = (
    "| workload | algorithm | variant | implementation | ms/step | p20–p80 ms | GB/s "
    "| % roofline | vs best torch | peak extra MiB |"
)


def markdown(
    rows: list[Row], rooflines: list[Roofline], environment: dict[str, Any], config: dict[str, Any]
) -> str:
    """The results table with its notes: bytes model, rooflines, memory method, skips."""
    lines = [_title(environment), "", TABLE_HEADER, "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [_table_line(row) for row in rows if row.status == "ok"]
    lines += ["", *_notes(rows), _rounds(rows, config)]
    lines += ["", "Rooflines (pure-memory stream moving the same bytes, median repetition):", ""]
    lines += ["| workload | elements | traffic | MB/step | median ms | GB/s |", "|---|---:|---|---:|---:|---:|"]
    for roof in rooflines:
        lines.append(
            f"| {roof.workload} | {roof.numel:,} | {roof.reads}R+{roof.writes}W × {roof.itemsize} B "
            f"| {_sig(roof.bytes / 1e6)} | {_sig(roof.median_ms)} | {_sig(roof.gbps)} |"
        )
    skipped = _skipped(rows)
    if skipped:
        lines += ["", "Skipped:", "", *skipped]
    return "\n".join(lines)


def _title(env: dict[str, Any]) -> str:
    hardware = env["gpu_name"] if env.get("gpu_name") else env["cpu_model"]
    threads = env["torch_threads"]
    sha = (env.get("git_sha") or "unknown")[:10] + (" (dirty)" if env.get("git_dirty") else "")
    return (
        f"## alr step microbenchmarks: {env['device']} ({hardware}), {threads} thread{'s' * (threads != 1)}\n\n"
        f"torch {env['torch']}, alr {env['alr']} (backends: {', '.join(env['alr_backends'])}), "
        f"triton {env['triton'] or 'not installed'}, git {sha}, {env['timestamp']}, "
        f"load average {_load(env.get('loadavg_start'))} at start, {_load(env.get('loadavg_end'))} at end"
        + _contention(env)
    )


CONTENTION_WARNING = 0.05
"""Share of all CPU time used by other processes above which the title carries a warning."""


def _contention(env: dict[str, Any]) -> str:
    other = env.get("other_processes_cpu_fraction")
    if other is None:
        return ""
    text = f"; other processes used {100 * other:.0f} % of the CPUs during the run"
    if other > CONTENTION_WARNING and env["device"].startswith("cpu"):
        text += (
            "\n\n**Warning:** other processes competed for the cores, so CPU timings are noisy; "
            "compare rows of one group (timed interleaved), or rerun on an idle machine or with "
            "fewer --threads."
        )
    return text


def _load(loadavg: list[float] | None) -> str:
    return "?" if not loadavg else f"{loadavg[0]:.1f}"


def _table_line(row: Row) -> str:
    speedup = "n/a" if row.speedup is None else f"{row.speedup:.2f}×"
    if row.variant in PLAIN_BASELINE_VARIANTS and row.speedup is not None:
        speedup += " †"
    memory = "n/a" if row.peak_extra_bytes is None else f"{row.peak_extra_bytes / 2**20:.1f}"
    return (
        f"| {row.workload} | {row.algorithm} | {row.variant} | {row.impl} | {_sig(row.median_ms)} "
        f"| {_sig(row.p20_ms)}–{_sig(row.p80_ms)} | {_sig(row.gbps)} | {row.pct_roofline:.0f} % "
        f"| {speedup} | {memory} |"
    )


def _sig(value: float) -> str:
    """About three significant digits, without switching to exponents."""
    for limit, digits in ((100, 0), (10, 1), (1, 2), (0.1, 3)):
        if value >= limit:
            return f"{value:,.{digits}f}"
    return f"{value:.2g}"


def _notes(rows: list[Row]) -> list[str]:
    ok = [row for row in rows if row.status == "ok"]
    dtype = ok[0].dtype if ok else "?"
    models = sorted({(row.algorithm, row.variant, row.traffic) for row in ok})
    notes = [
        f"Parameters and gradients in {dtype}, state too except in the low-precision variants. "
        "GB/s = bytes model / median time; the model counts whole-tensor streams of the "
        "parameter's size (Adam/AdamW read p, g, m, v and write p, m, v; SGD-momentum reads p, g, b "
        "and writes p, b; clip adds a read of g; hypergrad adds nothing; defaults adds the read of g "
        "of its nonfinite pre-pass; bf16-state, master and stochastic count each stream in its own "
        "dtype, master reading and writing a float32 master copy as well). Per group: "
        + "; ".join(f"{algorithm} {variant}: {traffic}" for algorithm, variant, traffic in models)
        + ".",
        (
            "% roofline = GB/s / the roofline below for the same workload and traffic, measured in "
            "this run. vs best torch = fastest torch implementation's median / this median."
        ),
    ]
    if any(row.variant in PLAIN_BASELINE_VARIANTS for row in ok):
        notes.append(
            "† hypergrad, defaults, bf16-state, master, stochastic: torch has no such step, so the "
            "baseline is the fastest plain torch step of the same workload and algorithm. hypergrad runs "
            'ALROptimizer(hypergrad="mult", skip_nonfinite=False); defaults runs ALROptimizer with '
            "its own defaults (nonfinite pre-pass and one-pass hypergradient)."
        )
    if any(row.variant == "clip" for row in ok):
        notes.append(
            "clip: torch and peer rows time clip_grad_norm_(params, 1.0, foreach=True) + step; "
            "alr rows clip inside the step (max_grad_norm=1.0)."
        )
    methods = sorted({row.memory_method for row in ok if row.memory_method})
    if methods:
        notes.append("Peak extra memory (beyond params, grads and state): " + "; ".join(methods) + ".")
    return notes


def _rounds(rows: list[Row], config: dict[str, Any]) -> str:
    """How many interleaved rounds were timed, naming the groups the time budget cut short."""
    text = (
        "Timing: per implementation 2 set-up steps (state creation, the profiled step), then per "
        f"group {config['warmup']} untimed and up to {config['reps']} timed interleaved rounds, "
        f"{config['max_group_seconds']:g} s budget for the timed rounds"
    )
    short = {}
    for row in rows:
        if row.status == "ok" and row.reps < config["reps"]:
            short[row.group] = row.reps
    if short:
        text += "; budget reached (rounds timed) in " + ", ".join(
            f"{' '.join(group)} ({reps})" for group, reps in short.items()
        )
    return text + "."


def _skipped(rows: list[Row]) -> list[str]:
    """One line per (implementation, reason), with the number of rows it took out."""
    counts = Counter((row.impl, row.reason) for row in rows if row.status == "skipped")
    return [
        f"- {impl} ({count} row{'s' * (count > 1)}): {reason}" for (impl, reason), count in counts.items()
    ]


def write_json(
    path: Path,
    rows: list[Row],
    rooflines: list[Roofline],
    environment: dict[str, Any],
    config: dict[str, Any],
) -> None:
    """Every figure, with the environment and the configuration it was measured under."""
    payload = {
        "environment": environment,
        "config": config,
        "rows": [asdict(row) for row in rows],
        "rooflines": [asdict(roof) for roof in rooflines],
    }
    path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
