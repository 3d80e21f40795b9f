"""Every native backend against the reference backend (the oracle), option by option.

Each test runs for every native backend that can run here, on its device (conftest's
``backend`` and ``device`` fixtures): ``cpu`` on CPU tensors; ``cuda`` on CUDA tensors;
``triton`` on CUDA tensors when a GPU is present, else on CPU tensors through Triton's
interpreter (``TRITON_INTERPRET=1``, which ``tests/run.sh`` sets: that is how CI tests the
kernels). The GPU backends take 16- and 32-bit parameters only.

Parameters, every state entry and κ are compared after every step with the one tolerance
rule of ``helpers``; a skipped step must leave everything bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from helpers import SHAPES, assert_bit_identical, assert_optimizer_state_close, snapshot
from parity import (
    CONFIGS,
    DTYPES,
    STEPS,
    assert_kappa_close,
    layout_params,
    make_pair,
    run_parity,
    set_same_grads,
    skip_unsupported_dtype,
    typed_params,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_parity_every_option(backend: str, device: torch.device, options: dict, dtype: torch.dtype) -> None:
    skip_unsupported_dtype(backend, dtype)
    run_parity(backend, lambda: typed_params([*SHAPES, (40,)], dtype, device=device), options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ["adamw-mult-group", "sgd-nesterov-mult-clip-maximize"])
def test_parity_with_grad_scaler(backend: str, device: torch.device, config: str, dtype: torch.dtype) -> None:
    """GradScaler hands its scale (and found_inf) to step(): unscaling happens in the kernel."""
    skip_unsupported_dtype(backend, dtype)
    scale = 2.0**9
    ps, opt, qs, ref = make_pair(backend, lambda: typed_params(SHAPES, dtype, device=device), CONFIGS[config])
    for step in range(STEPS):
        set_same_grads([ps, qs], seed=step, scale=scale)
        found = float(step == 3)  # one overflowing step: skipped by both
        for o in (opt, ref):
            o.grad_scale = torch.tensor(scale, device=device)
            o.found_inf = torch.tensor(found, device=device)
        opt.step()
        ref.step()
        assert_optimizer_state_close(opt, ps, ref, qs)
        assert_kappa_close(opt, ref)
    assert int(opt.stats().skipped_steps) == 1


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
@pytest.mark.parametrize(
    "config", ["adamw-mult-tensor-exact", "adam-add-exact-amsgrad-clip", "sgd-nesterov-mult-clip-maximize"]
)
def test_parity_shapes_and_layouts(backend: str, device: torch.device, config: str, dtype: torch.dtype) -> None:
    """Zero-size, scalar and odd sizes, tensors larger than a chunk, ~300 small tensors, and
    transposed, channels-last and non-dense parameters (whose state keeps their layout)."""
    # Two steps suffice for exact-HD's previous direction; the interpreter takes ~10 s a step here.
    steps = 2 if backend == "triton" else 4
    options = {**CONFIGS[config], "max_grad_norm": 50.0}
    ps, opt = run_parity(backend, lambda: layout_params(dtype, device), options, steps=steps)
    transposed, channels_last = ps[-3], ps[-2]
    assert transposed.stride() == (1, 20) and channels_last.is_contiguous(memory_format=torch.channels_last)
    for key, value in opt.state[channels_last].items():
        if value.dim() == 4:
            assert value.is_contiguous(memory_format=torch.channels_last), key


def test_parity_grad_layout_differs_from_param(backend: str, device: torch.device) -> None:
    """A contiguous gradient for a transposed or channels-last parameter goes through the
    staged (copying) path and gives the same results."""
    for config in ("adamw-mult-group", "sgd-momentum-mult"):
        run_parity(backend, lambda: layout_params(torch.float32, device)[-3:], CONFIGS[config], steps=4, like_param=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config", ["adamw-mult-group", "adam-add-exact-amsgrad-clip", "sgd-nesterov-mult-clip-maximize", "sgd-plain-mult-wd"]
)
def test_nonfinite_step_is_skipped_bit_identically(
    backend: str, device: torch.device, config: str, dtype: torch.dtype
) -> None:
    skip_unsupported_dtype(backend, dtype)
    options = {**CONFIGS[config], "skip_nonfinite": True}
    ps, opt, qs, ref = make_pair(backend, lambda: typed_params([*SHAPES, (300,)], dtype, device=device), options)
    poisons = {2: (1, float("inf")), 4: (5, float("nan")), 5: (0, float("-inf"))}
    for step in range(STEPS):
        set_same_grads([ps, qs], seed=step, poison=poisons.get(step))
        before = snapshot(opt, ps)
        opt.step()
        ref.step()
        if step in poisons:
            for index, (a, b) in enumerate(zip(snapshot(opt, ps), before)):
                assert_bit_identical(a, b, f"tensor {index} changed by a skipped step")
        assert_optimizer_state_close(opt, ps, ref, qs)
        assert_kappa_close(opt, ref)
    assert int(opt.stats().skipped_steps) == len(poisons)
