"""The sweep: the grid of runs and its execution on parallel worker processes.

Each worker is a fresh (spawned) interpreter that runs on one thread, so a run's numbers do
not depend on which worker ran it, on what it ran before, or on the number of workers: the
results are deterministic and come back in grid order.
"""

from __future__ import annotations

import itertools
import multiprocessing
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .tasks import TASKS
from .train import RunResult, RunSpec, run
from .variants import Variant


def lr_grid(low_exp: float, high_exp: float, per_decade: int) -> list[float]:
    """``10**e`` for e from ``low_exp`` to ``high_exp`` in steps of ``1/per_decade``."""
    count = round((high_exp - low_exp) * per_decade) + 1
    return [float(f"{10.0**e:.3g}") for e in np.linspace(low_exp, high_exp, count)]


def default_lrs(algorithm: str, per_decade: int = 2) -> list[float]:
    """The initial-lr grid: SGD-momentum 1e-6…1, Adam/AdamW 1e-6…1e-1."""
    return lr_grid(-6, 0 if algorithm == "sgd" else -1, per_decade)


@dataclass(frozen=True)
class Grid:
    """What to sweep: the product tasks × algorithms × variants × lrs × seeds.

    Attributes:
        lrs: the initial learning rates of each algorithm.
    """

    tasks: Sequence[str]
    algorithms: Sequence[str]
    variants: Sequence[Variant]
    lrs: dict[str, list[float]]
    seeds: Sequence[int]
    tiny: bool = False

    def specs(self) -> list[RunSpec]:
        """Every run, in a fixed order: task, algorithm, variant, lr, seed."""
        return [
            RunSpec(task, algorithm, variant, lr, seed, self.tiny)
            for task, algorithm, variant in itertools.product(self.tasks, self.algorithms, self.variants)
            for lr, seed in itertools.product(self.lrs[algorithm], self.seeds)
        ]


def _init_worker() -> None:
    # One thread per run: the runs, not the ops, are parallel, and timings stay comparable.
    torch.set_num_threads(1)


def _run_indexed(item: tuple[int, RunSpec]) -> tuple[int, RunResult]:
    index, spec = item
    return index, run(spec)


def _cost_order(specs: Sequence[RunSpec]) -> list[int]:
    """Indices with the slowest task first, so no worker is left with a long run at the end."""
    rank = {task: -i for i, task in enumerate(TASKS)}
    return sorted(range(len(specs)), key=lambda i: rank[specs[i].task])


def execute(specs: Sequence[RunSpec], workers: int) -> list[RunResult]:
    """Run every spec on ``workers`` spawned processes (in this one when 1), with a progress bar.

    Returns:
        the results in the order of ``specs``.
    """
    items = [(i, specs[i]) for i in _cost_order(specs)]
    results: list[RunResult | None] = [None] * len(specs)
    bar = tqdm(total=len(specs), desc="runs", unit="run", file=sys.stderr, dynamic_ncols=True)
    with bar:
        for index, result in _map(items, workers):
            results[index] = result
            bar.set_postfix_str(f"{result.spec.task} {result.spec.algorithm} {result.spec.variant.name}")
            bar.update()
    return [r for r in results if r is not None]


def _map(items: list[tuple[int, RunSpec]], workers: int) -> Iterable[tuple[int, RunResult]]:
    if workers <= 1:
        previous = torch.get_num_threads()
        _init_worker()
        try:
            yield from map(_run_indexed, items)
        finally:
            torch.set_num_threads(previous)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_run_indexed, items, chunksize=1)
