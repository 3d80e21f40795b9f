"""The CUDA C++ backend's own cases, beyond the backend-generic parity tests: a tensor with
more chunks than one launch holds, more tensors than one launch's slots, parameters that are
not 16-byte aligned (the kernels' scalar path), deterministic statistics that agree with the
CPU kernels, and the float64 rejection. Needs a GPU and alr._C_cuda; skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch

from alr import backends
from parity import CONFIGS, run_parity

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]

CHUNK = 16384
"""Elements per block of the CUDA kernels (csrc/cuda/multi_tensor.h kChunkSize)."""

ADAM_KWARGS = dict(
    algorithm="adam", beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
    amsgrad=False, maximize=False, momentum=0.0, dampening=0.0, nesterov=False, needs_prev_direction=False,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _cuda_backend() -> None:
    reason = backends.backend_unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")


def _packing_params(dtype: torch.dtype) -> list[torch.Tensor]:
    """331 chunks in one tensor (a launch holds 320 blocks), 70 small tensors (more than a
    launch's tensor slots), and two views at odd element offsets (misaligned: scalar path)."""
    generator = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device="cuda", dtype=dtype)

    big = randn(330 * CHUNK + 5)
    small = [randn(int(n)) for n in torch.randint(1, 3000, (70,), generator=generator)]
    misaligned = [randn(CHUNK + 9)[1:], randn(37)[3:]]
    return [t.detach().requires_grad_() for t in (big, *small, *misaligned)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "config", ["adamw-mult-group", "adam-add-exact-amsgrad-clip", "sgd-momentum-mult", "sgd-nesterov-mult-clip-maximize"]
)
def test_parity_across_launches_and_alignments(config: str, dtype: torch.dtype) -> None:
    params = _packing_params(dtype)
    assert params[-1].data_ptr() % 16 != 0 and params[-2].data_ptr() % 16 != 0
    run_parity("cuda", lambda: _packing_params(dtype), CONFIGS[config], steps=3)


def _adam_inputs(device: str) -> tuple[list[torch.Tensor], ...]:
    generator = torch.Generator().manual_seed(4)
    shapes = [330 * CHUNK + 5, 1, 4097, 0, 3 * CHUNK]
    params = [torch.randn(n, generator=generator).to(device) for n in shapes]
    grads = [torch.randn(n, generator=generator).to(device) for n in shapes]
    exp_avgs = [torch.randn(n, generator=generator).to(device) for n in shapes]
    exp_avg_sqs = [torch.rand(n, generator=generator).to(device) for n in shapes]
    steps = [torch.tensor(3.0, device=device) for _ in shapes]
    return params, grads, steps, exp_avgs, exp_avg_sqs


def test_statistics_are_deterministic_and_match_the_cpu_kernels() -> None:
    def stats(device: str) -> tuple[torch.Tensor, torch.Tensor]:
        params, grads, steps, exp_avgs, exp_avg_sqs = _adam_inputs(device)
        scale = torch.tensor(4.0, device=device)
        hyper = torch.ops.alr.hypergrad_stats(params, grads, steps, exp_avgs, exp_avg_sqs, [], [], [], scale, None, **ADAM_KWARGS)
        return hyper, torch.ops.alr.grad_stats(grads, scale)

    first = stats("cuda")
    for _ in range(3):
        again = stats("cuda")
        assert all(torch.equal(a, b) for a, b in zip(again, first))
    for gpu, cpu in zip(first, stats("cpu")):
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


def test_float64_is_rejected_with_its_dtype() -> None:
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16 parameters, got Double"):
        torch.ops.alr.grad_stats([torch.ones(3, dtype=torch.float64, device="cuda")], None)
