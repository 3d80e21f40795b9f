"""Named parameter sets the microbenchmarks step over, and their random tensors.

A workload is only a list of parameter shapes: the optimizers are elementwise, so what
matters for speed is the total size (memory traffic) and the number of tensors (per-tensor
overhead), not the model that owns them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DEFAULT_WORKLOADS", "WORKLOADS", "Workload", "make_tensors"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    """A named list of parameter shapes."""

    name: str
    shapes: tuple[Shape, ...]
    description: str

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def shrunk(self, factor: int, max_tensors: int = 16) -> Workload:
        """A miniature for smoke tests: every ``len/max_tensors``-th tensor, ``factor`` times smaller.

        Both the count and the sizes shrink, since a step's cost grows with both; the
        result keeps a mix of sizes but none of the original's performance character.
        """
        stride = max(1, math.ceil(len(self.shapes) / max_tensors))
        shapes = tuple((max(1, math.prod(shape) // factor),) for shape in self.shapes[::stride])
        return Workload(self.name, shapes, f"{self.description}, shrunk (tiny)")


def _gpt2_small() -> tuple[Shape, ...]:
    """The 148 parameter tensors of GPT-2 small (124,439,808 parameters), in module order."""
    vocab, context, width, layers = 50_257, 1_024, 768, 12
    shapes: list[Shape] = [(vocab, width), (context, width)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (width,), (width,),  # ln_1 weight, bias
            (width, 3 * width), (3 * width,),  # attn.c_attn (HF Conv1D: in x out)
            (width, width), (width,),  # attn.c_proj
            (width,), (width,),  # ln_2 weight, bias
            (width, 4 * width), (4 * width,),  # mlp.c_fc
            (4 * width, width), (width,),  # mlp.c_proj
        ]  # fmt: skip
    shapes += [(width,), (width,)]  # ln_f weight, bias
    return tuple(shapes)


WORKLOADS: dict[str, Workload] = {
    workload.name: workload
    for workload in (
        Workload(
            "mixed-34m",
            tuple([(4_194_304,)] * 6 + [(1_048_576,)] * 8 + [(4_096,)] * 50 + [(1_024,)] * 100),
            "33,861,632 parameters in 164 tensors: a transformer-like mix of sizes",
        ),
        Workload(
            "small-1000",
            ((1_024,),) * 1_000,
            "1,000 tensors of 1,024 elements: the per-tensor overhead regime",
        ),
        Workload("gpt2-small", _gpt2_small(), "the 148 parameter tensors of GPT-2 small (124M)"),
    )
}

DEFAULT_WORKLOADS: dict[str, tuple[str, ...]] = {
    "cpu": ("mixed-34m", "small-1000"),
    "cuda": ("gpt2-small", "small-1000"),
}
"""Workloads run when ``--workload`` is not given, per device type."""


def make_tensors(
    workload: Workload, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[list[Tensor], list[Tensor]]:
    """Standard-normal parameters and gradients for ``workload``.

    Drawn in float32 and rounded to ``dtype``, so every dtype sees the same values. Never
    zeros: a zero gradient would make the optimizer state (and so the measured work)
    unrepresentative of training.
    """
    generator = torch.Generator(device).manual_seed(seed)

    def draw(shape: Shape) -> Tensor:
        return torch.randn(shape, generator=generator, device=device).to(dtype)

    params = [draw(shape) for shape in workload.shapes]
    grads = [draw(shape) for shape in workload.shapes]
    return params, grads
