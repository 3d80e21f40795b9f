"""The bytes-moved model of an optimizer step, and a same-run memory roofline.

Bytes model
===========
A step's *useful* traffic is what an ideal single-pass kernel must move, counted in whole
tensors of the parameter's size. In the plain variants gradients and state have the
parameter's dtype (as in ``torch.optim``), so every stream is ``numel · itemsize`` bytes:

* Adam / AdamW: read p, g, m, v and write p, m, v: 4 reads + 3 writes = 7 streams
  (28 B per element in fp32, 14 B in bf16/fp16).
* SGD with momentum: read p, g, b and write p, b: 3 + 2 = 5 streams (20 B per fp32 element).
* ``clip`` (global-norm clipping) adds one read of g for the norm, which must be known
  before any parameter is updated: 8 and 6 streams.
* ``defaults`` (``ALROptimizer``'s own settings) adds the read of g of its nonfinite
  pre-pass, as ``clip`` does.
* ``hypergrad`` adds nothing: alr's default one-pass adaptation takes its statistics
  (``g·d_{t-1}``, ``|g|²``, ``|d_{t-1}|²``) from the p, g and state it already reads for
  the update, and applies κ at the next step.
* The low-precision variants follow the dtypes: ``bf16-state`` stores the moments (the
  momentum buffer) in bfloat16; ``master`` reads and writes a float32 master copy in place
  of reading the 16-bit parameter (which is still written) and keeps float32 state;
  ``stochastic`` keeps float32 state. Streams are then counted in units of the smallest
  size involved: with float32 parameters and bfloat16 moments, AdamW reads p, g (2 units
  each) and m, v (1 each) and writes p, m, v: 6R+4W units of 2 B = 20 B per element,
  against 28 B with float32 moments.

Scalars (step counters, κ, the norm) are ignored. An implementation that moves more than
the model (torch's ``clip_grad_norm_`` reads g for the norm and then reads and rewrites
it to scale it; an unfused implementation re-reads its temporaries) shows a lower GB/s.

Roofline
========
:class:`StreamKernel` is a pure memory kernel that moves the same bytes with the same
read/write mix, timed in the same run, on the same device and in the same interleaved
rounds as the steps it is compared with (see :mod:`bench.timing`). For a model of ``R``
reads and ``W`` writes it uses ``W`` float32 buffers that are read and written in place
and ``R - W`` read-only ones, each of ``numel · itemsize`` bytes, and runs ``W`` flat
in-place ops: ``w.add_(r)`` (2 reads, 1 write) while read-only buffers remain, then
``w.mul_(1.0)`` (1 read, 1 write). The roofline of a (workload, traffic) is its median
repetition over every group that shares it: the rows are medians too, and on a shared
machine the best repetition is an outlier (measured on the 2-core CPU machine: 18.7 ms
best against 28.1 ms median for mixed-34m Adam traffic). One contiguous tensor per stream has no
per-tensor overhead, so this is the bandwidth a step could reach, not a hard bound: a
single fused pass can beat the multi-pass stream slightly, so percentages a little over
100 % are possible. Where the streams fit in the CPU's caches it measures cache
bandwidth, the right ceiling for such a workload; ``small-1000`` (4 MiB per stream)
still spills from L2 on most CPUs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Roofline", "StreamKernel", "Traffic", "traffic"]


@dataclass(frozen=True)
class Traffic:
    """Whole-tensor streams one step moves, each of ``numel · unit`` bytes (a tensor whose
    elements take two units counts as two streams)."""

    reads: int
    writes: int
    unit: int

    @property
    def streams(self) -> int:
        return self.reads + self.writes

    def bytes(self, numel: int) -> int:
        return self.streams * numel * self.unit

    def describe(self) -> str:
        return f"{self.reads}R+{self.writes}W × {self.unit} B = {self.streams * self.unit} B/element"


LOW_PRECISION_STATE = {"bf16-state": 2, "master": 4, "stochastic": 4}
"""The state's itemsize in the low-precision variants (float32 under master weights and
stochastic rounding is alr's default for 16-bit parameters)."""


def traffic(algorithm: str, variant: str, itemsize: int) -> Traffic:
    """The bytes model (see the module docstring) of one step of ``algorithm`` in ``variant``
    with parameters (and gradients) of ``itemsize`` bytes."""
    state = LOW_PRECISION_STATE.get(variant, itemsize)
    master = 4 if variant == "master" else 0
    state_tensors = 1 if algorithm == "sgd" else 2
    reads = [master or itemsize, itemsize] + [state] * state_tensors  # p (or its master), g, state
    writes = [itemsize] + [master] * bool(master) + [state] * state_tensors
    if variant in ("clip", "defaults"):
        reads.append(itemsize)
    unit = math.gcd(*reads, *writes)
    return Traffic(sum(reads) // unit, sum(writes) // unit, unit)


@dataclass(frozen=True)
class Roofline:
    """The median bandwidth of the stream kernel for one (workload, traffic); ``itemsize`` is
    the traffic's unit."""

    workload: str
    reads: int
    writes: int
    numel: int
    itemsize: int
    bytes: int
    median_ms: float
    gbps: float
    times_ms: list[float]

    @classmethod
    def from_times(cls, workload: str, model: Traffic, numel: int, times_ms: list[float]) -> Roofline:
        total, median = model.bytes(numel), statistics.median(times_ms)
        return cls(
            workload,
            model.reads,
            model.writes,
            numel,
            model.unit,
            total,
            median,
            total / (median * 1e-3) / 1e9,
            times_ms,
        )


class StreamKernel:
    """Flat float32 buffers holding ``numel · itemsize`` bytes each, for the roofline kernels;
    a traffic of a smaller unit uses a leading part of each.

    float32 words whatever the parameter dtype: the kernel should be pure memory traffic,
    and 16-bit arithmetic on CPU adds conversions that a float32 add or multiply avoids.
    """

    def __init__(self, numel: int, itemsize: int, device: torch.device, buffers: int) -> None:
        self.numel, self.itemsize = numel, itemsize
        words = math.ceil(numel * itemsize / 4)
        self.buffers = [torch.rand(words, device=device) for _ in range(buffers)]

    def fn(self, model: Traffic) -> Callable[[], None]:
        """The kernel for ``model``: ``model.reads`` buffers, the first ``model.writes`` updated in place."""
        extra = model.reads - model.writes
        if extra > model.writes or model.reads > len(self.buffers) or model.unit > self.itemsize:
            raise ValueError(f"no stream kernel for {model} with {len(self.buffers)} buffers of {self.itemsize} B")
        words = math.ceil(self.numel * model.unit / 4)
        written = [b[:words] for b in self.buffers[: model.writes]]
        read_only = [b[:words] for b in self.buffers[model.writes : model.reads]]

        def stream() -> None:
            for i, buffer in enumerate(written):
                if i < extra:
                    buffer.add_(read_only[i])
                else:
                    buffer.mul_(1.0)

        return stream
