"""The CUDA C++ backend's own cases, beyond the backend-generic parity tests: a tensor with
more chunks than one launch holds, more tensors than one launch's slots, parameters that are
not 16-byte aligned (the kernels' scalar path), deterministic statistics that agree with the
CPU kernels, the float64 rejection, and every low-precision kernel variant (state dtype,
master weights, stochastic rounding) against the reference. Needs a GPU and alr._C_cuda;
skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch

import alr
from alr import backends
from helpers import assert_bit_identical, assert_optimizer_state_close, snapshot
from parity import CONFIGS, lr_for, make_pair, run_parity, set_same_grads

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]

CHUNK = 16384
"""Elements per block of the CUDA kernels (csrc/cuda/multi_tensor.h kChunkSize)."""

ADAM_KWARGS = dict(hyper=[0.9, 0.999, 1e-8, 0.0], decoupled_weight_decay=False, maximize=False)
SGD_KWARGS = dict(hyper=[0.9, 0.0, 0.0], nesterov=False, maximize=False)


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
        hyper = torch.ops.alr.adam_hypergrad_stats(params, grads, steps, exp_avgs, exp_avg_sqs, [], [], scale, None, **ADAM_KWARGS)
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


# --- Low precision ------------------------------------------------------------------------------

LOW_PRECISION = {
    "fp32-bf16-state": (torch.float32, dict(state_dtype=torch.bfloat16)),
    "bf16-fp32-state": (torch.bfloat16, dict(state_dtype=torch.float32)),
    "bf16-master-bf16-state": (torch.bfloat16, dict(master_weights=True, state_dtype=torch.bfloat16)),
    "bf16-master-fp32-state": (torch.bfloat16, dict(master_weights=True, state_dtype=torch.float32)),
    "bf16-stochastic-bf16-state": (torch.bfloat16, dict(stochastic_rounding=True, state_dtype=torch.bfloat16)),
    "bf16-stochastic-fp32-state": (torch.bfloat16, dict(stochastic_rounding=True, state_dtype=torch.float32)),
    "fp16-fp32-state": (torch.float16, dict(state_dtype=torch.float32)),
    "fp16-bf16-state": (torch.float16, dict(state_dtype=torch.bfloat16)),
    "fp16-master-fp32-state": (torch.float16, dict(master_weights=True, state_dtype=torch.float32)),
    "fp16-master-bf16-state": (torch.float16, dict(master_weights=True, state_dtype=torch.bfloat16)),
}
"""Every storage variant of the kernels beyond torch.optim's (state in the parameters' dtype,
rounded to nearest; covered by the parity tests): csrc/cuda/launch.h's kVariants."""

LOW_PRECISION_CONFIGS = {
    # Statistics-only pre-pass (coupled decay reads the master), then the update.
    "adam-exact-amsgrad-coupled-wd": dict(
        algorithm="adam", amsgrad=True, weight_decay=0.1, hypergrad="mult", hypergrad_lr=0.05, hypergrad_exact=True
    ),
    "adamw-mult-clip": dict(
        algorithm="adamw", weight_decay=0.1, max_grad_norm=1.0, hypergrad="mult", hypergrad_lr=0.05
    ),
    "sgd-momentum-dampening-add": dict(
        algorithm="sgd", momentum=0.9, dampening=0.3, weight_decay=0.05, hypergrad="add", hypergrad_lr=1e-3
    ),
    "sgd-nesterov-exact-maximize": dict(
        algorithm="sgd", momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True, hypergrad="mult",
        hypergrad_lr=0.05, hypergrad_exact=True,
    ),
}  # fmt: skip


def _low_precision_params(dtype: torch.dtype, two_chunks: bool = False) -> list[torch.Tensor]:
    """Odd sizes, a scalar, an empty tensor, a misaligned view (scalar path), a transposed
    leaf (rounding offsets follow its memory), a non-dense leaf (stepped as a contiguous
    copy) and, with two_chunks, a tensor whose second chunk's rounding offsets start at CHUNK.
    (Parity runs leave it out: a float32 master driven by 16-bit moments drifts from the
    reference by an ulp of the moments wherever κ's last bits flip a rounding, and more
    elements make a drift past the float32 tolerance likelier.)"""
    generator = torch.Generator().manual_seed(5)

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device="cuda", dtype=dtype)

    tensors = [
        randn((1500,)), randn(()), randn((0,)), randn((37,))[3:], randn((33, 20)).t(), randn((9, 16))[:, ::2],
        *([randn((CHUNK + 9,))] if two_chunks else []),
    ]  # fmt: skip
    return [t.detach().requires_grad_() for t in tensors]


@pytest.mark.parametrize("case", LOW_PRECISION.keys())
@pytest.mark.parametrize("config", LOW_PRECISION_CONFIGS.keys())
def test_low_precision_parity(config: str, case: str) -> None:
    """Parameters, master copies and every state tensor follow the reference step by step."""
    dtype, low_precision = LOW_PRECISION[case]
    options = {**LOW_PRECISION_CONFIGS[config], **low_precision}
    run_parity("cuda", lambda: _low_precision_params(dtype), options, steps=3)


SR_CONFIGS = {
    # β2 = 0 makes v = g² one rounding in the kernel and in torch's fused addcmul alike.
    "adamw": dict(algorithm="adamw", betas=(0.9, 0.0), weight_decay=0.1),
    "adam-amsgrad-coupled-wd": dict(algorithm="adam", betas=(0.9, 0.0), amsgrad=True, weight_decay=0.1),
    "sgd-momentum-dampening": dict(algorithm="sgd", momentum=0.9, dampening=0.3, weight_decay=0.05),
    "sgd-nesterov-maximize": dict(algorithm="sgd", momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
}


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=["bf16-state", "fp32-state"])
@pytest.mark.parametrize("config", SR_CONFIGS.keys())
def test_stochastic_rounding_is_bit_identical_to_the_reference(config: str, state_dtype: torch.dtype) -> None:
    """Each element rounds up exactly where the reference's stream (key, step, element offset)
    says. The runs keep every float32 value bit-identical up to the rounding: κ is not adapted
    and nothing is clipped (sums of statistics differ in their last bits between backends)."""
    options = {**SR_CONFIGS[config], "hypergrad": "off", "stochastic_rounding": True, "state_dtype": state_dtype}
    ps, opt, qs, ref = make_pair("cuda", lambda: _low_precision_params(torch.bfloat16, two_chunks=True), options)
    for step in range(6):
        set_same_grads([ps, qs], seed=step)
        opt.step()
        ref.step()
        for index, (p, q) in enumerate(zip(ps, qs)):
            assert_bit_identical(p.detach(), q.detach(), f"step {step}: params[{index}] rounded differently")
        assert_optimizer_state_close(opt, ps, ref, qs)


@pytest.mark.parametrize("case", LOW_PRECISION.keys())
@pytest.mark.parametrize("config", ["adamw-mult-clip", "sgd-nesterov-exact-maximize"])
def test_skipped_step_leaves_every_tensor_bit_identical(config: str, case: str) -> None:
    """A non-finite gradient skips the step: parameters, master copies, state, step counters
    and κ keep their bits (the kernels write nothing)."""
    dtype, low_precision = LOW_PRECISION[case]
    options = {**LOW_PRECISION_CONFIGS[config], **low_precision, "skip_nonfinite": True}
    params = _low_precision_params(dtype, two_chunks=True)
    opt = alr.ALROptimizer(params, backend="cuda", lr=lr_for(options), **options)
    for step in range(3):
        set_same_grads([params], seed=step, poison=(0, float("nan")) if step == 1 else None)
        before = snapshot(opt, params)
        opt.step()
        if step == 1:
            for index, (after, expected) in enumerate(zip(snapshot(opt, params), before)):
                assert_bit_identical(after, expected, f"the skipped step changed tensor {index}")
    assert int(opt.stats().skipped_steps) == 1


def test_fp16_master_weights_with_fp16_state_are_refused_by_name() -> None:
    """The one combination the ops' checks accept that the optimizer never makes (its
    state_dtype is float32 or bfloat16): no kernel, as on the CPU."""
    params = [torch.ones(3, dtype=torch.float16, device="cuda")]
    zeros = [torch.zeros_like(params[0])]
    steps = [torch.zeros((), device="cuda")]
    alphas = torch.ones(1, dtype=torch.float64, device="cuda")
    masters = [params[0].float()]
    with pytest.raises(RuntimeError, match="no kernel for Half parameters with Half state"):
        torch.ops.alr.sgd_update_(params, zeros, steps, zeros, [], masters, [], alphas, None, None, None, collect_stats=False, **SGD_KWARGS)
