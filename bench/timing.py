"""Timing and peak-memory measurement of one optimizer step, on CPU or CUDA.

Timing
======
The steps of one group (its implementations and the roofline kernel) are timed in
*interleaved rounds*: every round runs each of them once, starting at a rotating offset,
so a burst of load from other processes slows all of them alike and their ratios stay
meaningful on a shared machine; it also means each step starts with caches holding other
tensors, as in training, where the forward and backward passes run between steps. The
caller has already run every step at least once (lazy state creation is not timed).
:func:`time_interleaved` runs ``warmup`` untimed rounds and up to ``reps`` timed ones
(fewer when an optional time budget runs out, but at least :data:`MIN_REPS`) and keeps
every repetition, so the report can give the median with p20/p80.

* CPU: :func:`time.perf_counter_ns` around each call, with the garbage collector off
  during the rounds (as ``timeit`` and ``torch.utils.benchmark`` do). ATen's CPU ops are
  synchronous, so no synchronisation is needed. ``torch.utils.benchmark.Timer`` is not
  used because it times one callable at a time (no interleaving), yields one time per
  block, and runs single-threaded unless told otherwise.
* CUDA: a pair of CUDA events around each call, on the current stream, read after one
  synchronisation at the end, so that no host sync sits between repetitions. Before each
  call (outside the events) a 256 MiB buffer is zeroed to evict the L2 cache, as
  ``triton.testing.do_bench`` does.

Peak extra memory
=================
What the step allocates beyond the resident parameters, gradients and state:

* CUDA: ``torch.cuda.max_memory_allocated`` after one step minus ``memory_allocated``
  before it (peak statistics reset first). Exact for PyTorch's caching allocator.
* CPU: one step under ``torch.profiler.profile(profile_memory=True)``; the allocation
  (+bytes) and free (-bytes) events of PyTorch's CPU allocator are summed in time order
  and the running maximum is kept. Approximate: it sees only allocations made through
  PyTorch's allocator (not, e.g., a third-party extension's own ``malloc``) and relies on
  the profiler's event timestamps for ordering.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["MemoryPeak", "Timing", "peak_extra_memory", "time_interleaved"]

L2_FLUSH_BYTES = 256 * 1024**2
"""Several times the L2 cache of current GPUs (H100: 50 MiB); ``do_bench`` uses the same size."""

MIN_REPS = 3
"""Timed rounds kept even when the time budget is spent: enough for a median."""

CPU_MEMORY_METHOD = "torch.profiler profile_memory: running sum of CPU allocator events (approximate)"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated delta (exact for the caching allocator)"


@dataclass(frozen=True)
class Timing:
    """Milliseconds of each timed repetition, in the order they ran."""

    times_ms: list[float]

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile, ``q`` in [0, 1]."""
        ordered = sorted(self.times_ms)
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p20_ms(self) -> float:
        return self.quantile(0.2)

    @property
    def p80_ms(self) -> float:
        return self.quantile(0.8)


@dataclass(frozen=True)
class MemoryPeak:
    """Peak bytes allocated during one step beyond what was allocated before it."""

    bytes: int | None
    method: str
    error: str | None = None


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    warmup: int,
    reps: int,
    max_seconds: float | None = None,
) -> list[Timing]:
    """Time each of ``fns`` in up to ``reps`` interleaved rounds (see the module docstring).

    ``max_seconds`` bounds the timed rounds' host wall time: once it is spent, timing stops
    after the current round, keeping at least :data:`MIN_REPS` rounds. On a machine shared
    with other jobs a step can be ten times slower than on an idle one; the budget keeps a
    quick run quick and the report says how many rounds each row got.
    """
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    for round_ in range(warmup):
        for _, fn in _rotated(fns, round_):
            fn()
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    if device.type == "cuda":
        return _time_cuda(fns, device, reps, deadline)
    return _time_cpu(fns, reps, deadline)


def _more_rounds(done: int, reps: int, deadline: float | None) -> bool:
    if done >= reps:
        return False
    return done < MIN_REPS or deadline is None or time.monotonic() < deadline


def _rotated(fns: Sequence[Callable[[], object]], round_: int) -> list[tuple[int, Callable[[], object]]]:
    """``fns`` with their indices, starting at ``round_ % len(fns)``."""
    start = round_ % len(fns)
    order = list(range(start, len(fns))) + list(range(start))
    return [(i, fns[i]) for i in order]


def _time_cpu(fns: Sequence[Callable[[], object]], reps: int, deadline: float | None) -> list[Timing]:
    times: list[list[float]] = [[] for _ in fns]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        round_ = 0
        while _more_rounds(round_, reps, deadline):
            round_ += 1
            for i, fn in _rotated(fns, round_):
                start = time.perf_counter_ns()
                fn()
                times[i].append((time.perf_counter_ns() - start) * 1e-6)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [Timing(t) for t in times]


def _time_cuda(
    fns: Sequence[Callable[[], object]], device: torch.device, reps: int, deadline: float | None
) -> list[Timing]:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    events: list[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = [[] for _ in fns]
    torch.cuda.synchronize(device)
    round_ = 0
    # The deadline is checked on the host, which runs ahead of the GPU: it bounds the
    # launches, and the one synchronisation at the end waits for the rest.
    while _more_rounds(round_, reps, deadline):
        round_ += 1
        for i, fn in _rotated(fns, round_):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush.zero_()
            start.record()
            fn()
            end.record()
            events[i].append((start, end))
    torch.cuda.synchronize(device)
    return [Timing([start.elapsed_time(end) for start, end in pairs]) for pairs in events]


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> MemoryPeak:
    """Run ``fn`` once and measure its peak extra allocation (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return MemoryPeak(torch.cuda.max_memory_allocated(device) - before, CUDA_MEMORY_METHOD)
    return _cpu_peak(fn)


def _cpu_peak(fn: Callable[[], object]) -> MemoryPeak:
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        # kineto_results is the profiler's raw event list: the only place where allocation
        # events keep their own timestamps instead of being folded into the op that made them.
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        deltas = [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())]
    except AttributeError as exc:  # the private event API moved in this torch version
        return MemoryPeak(None, CPU_MEMORY_METHOD, f"profiler events unreadable: {exc}")
    current = peak = 0
    for delta in deltas:
        current += delta
        peak = max(peak, current)
    return MemoryPeak(peak, CPU_MEMORY_METHOD)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration.

    Kineto writes ``profiler_start``/``profiler_stop`` lines straight to fd 2 from C++,
    which would break the progress bar; Python-level redirection cannot catch them.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
