"""Command line of ``python -m bench.convergence``.

Modes: the full sweep by default (every task, algorithm and built-in variant, the
half-decade lr grid, 3 seeds); ``--quick`` (AdamW and SGD, one seed, a whole-decade grid,
baseline against the default ALR configuration: under 5 minutes on 2 cores); ``--tiny``
(tests only: a few steps, 2 lrs, 1 seed); ``--render DIR`` redoes the markdown and the PNGs
of a finished sweep from its ``results.json``. Filters narrow any mode, and every
``--alr-config`` becomes one named variant, for choosing the defaults::

    python -m bench.convergence --task digits-mlp --algorithm sgd \\
        --alr-config '{"name": "β=0.05", "hypergrad_lr": 0.05, "kappa_max": 1e4}'
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import alr

from . import metrics, plots, report
from .report import SweepInfo
from .sweep import Grid, default_lrs, execute
from .tasks import TASKS, get_task
from .variants import (
    ALGORITHMS,
    BUILTIN_VARIANTS,
    QUICK_VARIANTS,
    Variant,
    parse_alr_config,
    resolved_settings,
)

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
TINY_LRS = [1e-3, 1e-2]
DEFAULT_SEEDS = [0, 1, 2]
QUICK_ALGORITHMS = ("adamw", "sgd")
"""--quick leaves out Adam (AdamW without decoupled decay) to stay under 5 minutes."""


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.convergence",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="AdamW and SGD, 1 seed, whole decades, baseline vs mult")
    mode.add_argument("--tiny", action="store_true", help="for tests: a few steps, 2 lrs, 1 seed")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/convergence-<timestamp>)")
    parser.add_argument("--task", type=_csv, action="extend", help=f"comma-separated subset of {', '.join(TASKS)}")
    parser.add_argument("--algorithm", type=_csv, action="extend", help=f"subset of {', '.join(ALGORITHMS)}")
    parser.add_argument(
        "--variant", type=_csv, action="extend", help=f"built-in ({', '.join(BUILTIN_VARIANTS)}) or --alr-config names"
    )
    parser.add_argument("--seeds", type=_csv, help="comma-separated seeds (default 0,1,2; quick and tiny: 0)")
    parser.add_argument("--lrs", type=_csv, help="comma-separated initial lrs for every algorithm")
    parser.add_argument(
        "--alr-config",
        action="append",
        default=[],
        metavar="JSON",
        help='ALR settings of one extra variant, e.g. \'{"name": "b05", "hypergrad_lr": 0.05}\'; repeatable; '
        'a value may be keyed by algorithm: {"hypergrad_lr": {"adam": 1e-7, "adamw": 1e-7, "sgd": 1e-3}}',
    )
    parser.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    parser.add_argument(
        "--render", type=Path, metavar="DIR", help="only redo summary.md and the PNGs from DIR/results.json"
    )
    return parser.parse_args(argv)


def _pick(requested: list[str] | None, known: Sequence[str], default: Sequence[str], what: str) -> list[str]:
    chosen = list(dict.fromkeys(requested)) if requested else list(default)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return chosen


def _variants(args: argparse.Namespace) -> list[Variant]:
    """Built-ins and --alr-config variants, as selected by --variant and the mode."""
    try:
        custom = [parse_alr_config(text) for text in args.alr_config]
    except (TypeError, ValueError) as error:
        raise SystemExit(str(error)) from None
    known = {**BUILTIN_VARIANTS, **{v.name: v for v in custom}}
    if len(known) < len(BUILTIN_VARIANTS) + len(custom):
        raise SystemExit("--alr-config names must differ from each other and from the built-in variants")
    if custom:
        default = ["baseline", *(v.name for v in custom)]
    elif args.quick or args.tiny:
        default = list(QUICK_VARIANTS)
    else:
        default = list(BUILTIN_VARIANTS)
    return [known[name] for name in _pick(args.variant, list(known), default, "variant")]


def _lrs(args: argparse.Namespace, algorithms: Sequence[str]) -> dict[str, list[float]]:
    if args.lrs:
        lrs = sorted({float(x) for x in args.lrs})
        return {a: lrs for a in algorithms}
    if args.tiny:
        return {a: list(TINY_LRS) for a in algorithms}
    return {a: default_lrs(a, per_decade=1 if args.quick else 2) for a in algorithms}


def build_grid(args: argparse.Namespace) -> Grid:
    """The runs the arguments ask for."""
    algorithms = _pick(args.algorithm, ALGORITHMS, QUICK_ALGORITHMS if args.quick else ALGORITHMS, "algorithm")
    seeds = [int(s) for s in args.seeds] if args.seeds else ([0] if args.quick or args.tiny else DEFAULT_SEEDS)
    return Grid(
        tasks=_pick(args.task, TASKS, TASKS, "task"),
        algorithms=algorithms,
        variants=_variants(args),
        lrs=_lrs(args, algorithms),
        seeds=seeds,
        tiny=args.tiny,
    )


def _task_info(grid: Grid) -> dict[str, dict[str, Any]]:
    info = {}
    for name in grid.tasks:
        task = get_task(name, grid.tiny)
        info[name] = {
            "description": task.description,
            "metric": task.metric,
            "steps": task.size.steps,
            "batch_size": task.size.batch_size,
            "params": sum(p.numel() for p in task.build_model().parameters()),
        }
    return info


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "alr": alr.__version__,
        "numpy": np.__version__,
        # From the metadata: importing scikit-learn costs seconds, and only workers need it.
        "scikit-learn": importlib.metadata.version("scikit-learn"),
    }


def render(out: Path, payload: report.Payload) -> str:
    """Write ``summary.md`` and the PNGs of ``payload`` into ``out``; returns the markdown."""
    text = report.markdown(payload)
    (out / "summary.md").write_text(text, encoding="utf-8")
    pngs = plots.write_plots(out, payload)
    print(f"wrote {out / 'summary.md'} and {len(pngs)} PNGs", file=sys.stderr)
    return text


def sweep(args: argparse.Namespace, argv: Sequence[str] | None) -> tuple[Path, report.Payload]:
    """Run the grid the arguments ask for; write and return its ``results.json``."""
    grid = build_grid(args)
    started = datetime.datetime.now().astimezone()
    out = args.out or RESULTS_DIR / f"convergence-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    specs = grid.specs()
    print(f"{len(specs)} runs on {args.workers} worker(s) → {out}", file=sys.stderr)
    clock = time.perf_counter()
    results = execute(specs, args.workers)
    info = SweepInfo(
        command=shlex.join(["python", "-m", "bench.convergence", *(sys.argv[1:] if argv is None else argv)]),
        started=started.isoformat(timespec="seconds"),
        versions=_versions(),
        workers=args.workers,
        tasks=_task_info(grid),
        variants=list(grid.variants),
        resolved={v.name: {a: resolved_settings(v, a) for a in grid.algorithms} for v in grid.variants},
        lrs=grid.lrs,
        seeds=list(grid.seeds),
        wall_s=time.perf_counter() - clock,
    )
    summaries = metrics.summarise(results, {name: task["metric"] for name, task in info.tasks.items()})
    payload = report.build_payload(info, results, summaries)
    report.write_json(out / "results.json", payload)
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return out, payload


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        out, payload = args.render, report.read_json(args.render / "results.json")
    else:
        out, payload = sweep(args, argv)
    print(render(out, payload))
    return 0
