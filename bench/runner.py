"""Plans the benchmark matrix, measures every group and derives the per-row figures.

A *group* is one (workload, algorithm, variant); its rows are the implementations of
:mod:`bench.implementations`. All implementations of a group are built side by side, each
on its own copy of the workload's parameters and gradients (reset from one random draw at
the start of every group, so one implementation's steps, or torch's in-place gradient
clipping, cannot change what another sees) and with a fresh optimizer whose state its
first step creates. They are then timed together with the group's roofline kernel in
interleaved rounds (:func:`bench.timing.time_interleaved`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from .implementations import PLAIN_BASELINE_VARIANTS, Impl, implementations
from .roofline import Roofline, StreamKernel, Traffic, traffic
from .timing import peak_extra_memory, time_interleaved
from .workloads import Workload, make_tensors

__all__ = ["Config", "Row", "run"]


@dataclass(frozen=True)
class Config:
    """What to run and how (the parsed command line)."""

    device: torch.device
    dtype: torch.dtype
    workloads: list[Workload]
    algorithms: list[str]
    variants: list[str]
    backends: list[str] | None
    warmup: int
    reps: int
    max_group_seconds: float | None = None
    progress: bool = True

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Row:
    """Every figure of one implementation in one group (None where not measured)."""

    workload: str
    algorithm: str
    variant: str
    impl: str
    kind: str
    device: str
    dtype: str
    n_tensors: int
    numel: int
    traffic: str
    bytes_per_step: int
    status: str = "ok"  # "ok" or "skipped"
    reason: str | None = None
    reps: int = 0
    times_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    roofline_gbps: float | None = None
    pct_roofline: float | None = None
    baseline_impl: str | None = None
    baseline_ms: float | None = None
    speedup: float | None = None
    peak_extra_bytes: int | None = None
    memory_method: str | None = None

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.workload, self.algorithm, self.variant)


@dataclass(frozen=True)
class _Group:
    workload: Workload
    algorithm: str
    variant: str
    impls: tuple[Impl, ...]
    itemsize: int

    @property
    def traffic(self) -> Traffic:
        return traffic(self.algorithm, self.variant, self.itemsize)

    @property
    def roofline_key(self) -> tuple[str, Traffic]:
        return (self.workload.name, self.traffic)


def _plan(config: Config) -> list[_Group]:
    """Every group to run, workload by workload so each workload's tensors are made once.

    The ``hypergrad`` and ``defaults`` groups are compared with the plain torch step, so
    those baselines are measured even when ``plain`` itself was not asked for.
    """
    groups = []
    for workload in config.workloads:
        for algorithm in config.algorithms:
            variants = list(config.variants)
            baseline_only = "plain" not in variants and any(v in PLAIN_BASELINE_VARIANTS for v in variants)
            if baseline_only:
                variants.insert(0, "plain")
            for variant in variants:
                impls = implementations(algorithm, variant, config.device, config.backends)
                if variant == "plain" and baseline_only:
                    impls = [impl for impl in impls if impl.kind == "torch"]
                groups.append(_Group(workload, algorithm, variant, tuple(impls), config.itemsize))
    return groups


class _TensorPool:
    """One workload's random draw and reusable copies of it, one per implementation.

    Reusing the copies across groups (reset with ``copy_``) avoids reallocating, and
    page-faulting, hundreds of MiB for every group.
    """

    def __init__(self, workload: Workload, dtype: torch.dtype, device: torch.device) -> None:
        self.params, self.grads = make_tensors(workload, dtype, device)
        self.copies: list[list[Tensor]] = []

    def take(self, n: int) -> list[list[Tensor]]:
        """``n`` parameter lists, reset to the draw, each parameter's ``.grad`` set."""
        while len(self.copies) < n:
            params = [p.clone().requires_grad_() for p in self.params]
            for p, g in zip(params, self.grads):
                p.grad = g.clone()
            self.copies.append(params)
        with torch.no_grad():
            for params in self.copies[:n]:
                for p, master_p, master_g in zip(params, self.params, self.grads):
                    p.copy_(master_p)
                    p.grad.copy_(master_g)
        return self.copies[:n]


def run(config: Config) -> tuple[list[Row], list[Roofline]]:
    """Measure every planned group; returns the rows (in plan order) and the rooflines."""
    groups = _plan(config)
    rows: list[Row] = []
    stream_times: dict[tuple[str, Traffic], list[float]] = {}
    bar = tqdm(
        total=sum(len(g.impls) for g in groups),
        desc="bench",
        unit="row",
        file=sys.stderr,
        disable=not config.progress,
    )
    pool: _TensorPool | None = None
    kernel: StreamKernel | None = None
    current: str | None = None
    for group in groups:
        bar.set_postfix_str(f"{group.workload.name} {group.algorithm} {group.variant}")
        if group.workload.name != current:
            pool = kernel = None  # free the previous workload's tensors before allocating
            current = group.workload.name
            pool = _TensorPool(group.workload, config.dtype, config.device)
            models = [g.traffic for g in groups if g.workload.name == current]
            buffers, unit = max(m.reads for m in models), max(m.unit for m in models)
            kernel = StreamKernel(group.workload.numel, unit, config.device, buffers)
        rows += _run_group(group, pool, kernel, config, stream_times)
        if config.device.type == "cuda":
            torch.cuda.empty_cache()  # the group's optimizer state is gone: hand it back
        bar.update(len(group.impls))
    bar.close()
    rooflines = {
        key: Roofline.from_times(key[0], key[1], _numel(groups, key[0]), times) for key, times in stream_times.items()
    }
    _finalize(rows, rooflines, config.itemsize)
    return rows, list(rooflines.values())


def _numel(groups: list[_Group], workload: str) -> int:
    return next(g.workload.numel for g in groups if g.workload.name == workload)


def _run_group(
    group: _Group,
    pool: _TensorPool,
    kernel: StreamKernel,
    config: Config,
    stream_times: dict[tuple[str, Traffic], list[float]],
) -> list[Row]:
    model, workload = group.traffic, group.workload
    rows = [
        Row(
            workload=workload.name,
            algorithm=group.algorithm,
            variant=group.variant,
            impl=impl.name,
            kind=impl.kind,
            device=str(config.device),
            dtype=str(config.dtype).removeprefix("torch."),
            n_tensors=workload.n_tensors,
            numel=workload.numel,
            traffic=model.describe(),
            bytes_per_step=model.bytes(workload.numel),
        )
        for impl in group.impls
    ]
    runnable = []
    for row, impl in zip(rows, group.impls):
        if impl.make is None:
            row.status, row.reason = "skipped", impl.unavailable
        else:
            runnable.append((row, impl))
    live = []
    for (row, impl), params in zip(runnable, pool.take(len(runnable))):
        try:
            step = impl.make(params)
            # The first step creates the state, which is resident, not per-step memory;
            # the second, profiled, runs on filled state like every timed step after it.
            step()
            memory = peak_extra_memory(step, config.device)
        except Exception as exc:  # noqa: BLE001 (an implementation that cannot run here is reported)
            row.status, row.reason = "skipped", _one_line(exc)
            continue
        row.peak_extra_bytes = memory.bytes
        row.memory_method = memory.method if memory.error is None else f"{memory.method}: {memory.error}"
        live.append((row, params, step))
    try:
        timings = time_interleaved(
            [step for _, _, step in live] + [kernel.fn(model)],
            config.device,
            config.warmup,
            config.reps,
            config.max_group_seconds,
        )
    except Exception as exc:  # noqa: BLE001 (a step that ran twice then fails: report, go on)
        for row, _, _ in live:
            row.status, row.reason = "skipped", f"failed while timing the group: {_one_line(exc)}"
        return rows
    stream_times.setdefault(group.roofline_key, []).extend(timings[-1].times_ms)
    for (row, params, _), timing in zip(live, timings):
        if not all(math.isfinite(t) and t > 0 for t in timing.times_ms):
            row.status, row.reason = "skipped", f"non-positive or non-finite timings: {timing.times_ms}"
        elif not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            row.status, row.reason = "skipped", "parameters became nonfinite while timing"
        else:
            row.reps, row.times_ms = len(timing.times_ms), timing.times_ms
            row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
            row.gbps = row.bytes_per_step / (row.median_ms * 1e-3) / 1e9
    return rows


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _finalize(rows: list[Row], rooflines: dict[tuple[str, Traffic], Roofline], itemsize: int) -> None:
    """Roofline percentages, and speedups against the fastest torch implementation of the group.

    ``hypergrad`` and ``defaults`` groups have no torch implementation; they are compared
    with the fastest plain torch step of the same workload and algorithm.
    """
    best: dict[tuple[str, str, str], Row] = {}
    for row in rows:
        if row.kind != "torch" or row.status != "ok":
            continue
        if row.group not in best or row.median_ms < best[row.group].median_ms:
            best[row.group] = row
    for row in rows:
        if row.status != "ok":
            continue
        roofline = rooflines.get((row.workload, traffic(row.algorithm, row.variant, itemsize)))
        if roofline is not None:
            row.roofline_gbps = roofline.gbps
            row.pct_roofline = 100 * row.gbps / roofline.gbps
        key = (row.workload, row.algorithm, "plain") if row.variant in PLAIN_BASELINE_VARIANTS else row.group
        baseline = best.get(key)
        if baseline is not None:
            row.baseline_impl, row.baseline_ms = baseline.impl, baseline.median_ms
            row.speedup = baseline.median_ms / row.median_ms
