"""Numerics helpers shared by every test: the one tolerance rule and state comparisons."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# torch.testing's per-dtype defaults (rtol, atol) for a single op ...
_SINGLE_OP = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}
# ... loosened as PyTorch's test_optim does, since an optimizer step chains many ops.
_FUSED_STEP_FACTOR = 5


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing optimizer trajectories stored in ``dtype``.

    For 16-bit storage the absolute tolerance is two units in the last place at 1.0: a
    one-ulp rounding difference made while a value was large (one fp32 fma versus two fp32
    roundings before the store, as between torch's fused kernel and its for-loop) persists
    as an absolute error while the value decays towards zero.
    """
    rtol, atol = (tol * _FUSED_STEP_FACTOR for tol in _SINGLE_OP[dtype])
    if dtype in (torch.float16, torch.bfloat16):
        atol = 2 * torch.finfo(dtype).eps
    return rtol, atol


def assert_tensors_close(actual: Tensor, expected: Tensor, msg: str = "") -> None:
    """Same shape, dtype and device, values within :func:`tolerances` of ``expected.dtype``."""
    if not expected.is_floating_point():
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{msg}: {m}")
        return
    rtol, atol = tolerances(expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def assert_optimizer_state_close(
    actual_opt: torch.optim.Optimizer,
    actual_params: Sequence[Tensor],
    expected_opt: torch.optim.Optimizer,
    expected_params: Sequence[Tensor],
) -> None:
    """Parameters and every state entry of ``expected_opt`` match in ``actual_opt``.

    Every key of the expected state must exist in the actual state (alr may hold more).
    Step counters compare as numbers, since torch may keep them on another device.
    """
    assert len(actual_params) == len(expected_params)
    for index, (actual, expected) in enumerate(zip(actual_params, expected_params)):
        assert_tensors_close(actual.detach(), expected.detach(), f"params[{index}]")
        expected_state = expected_opt.state.get(expected, {})
        actual_state = actual_opt.state.get(actual, {})
        for key, value in expected_state.items():
            assert key in actual_state, f"params[{index}]: state key {key!r} missing"
            got = actual_state[key]
            if key == "step":
                assert float(got) == float(value), f"params[{index}]: step {float(got)} != {float(value)}"
            elif isinstance(value, Tensor):
                assert_tensors_close(got, value, f"params[{index}].{key}")
            else:
                assert got == value, f"params[{index}].{key}: {got} != {value}"


def assert_bit_identical(actual: Tensor, expected: Tensor, msg: str = "") -> None:
    """Same dtype, shape and bytes (so -0.0 vs 0.0 and NaN payloads count)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
    a, e = actual.detach().contiguous().view(-1), expected.detach().contiguous().view(-1)
    if a.numel():
        assert torch.equal(a.view(torch.uint8), e.view(torch.uint8)), f"{msg}: bits differ"


def snapshot(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    """Copies of the parameters, every state tensor and every param-group tensor, in order."""
    tensors = [p.detach().clone() for p in params]
    for p in params:
        for key in sorted(opt.state.get(p, {})):
            value = opt.state[p][key]
            if isinstance(value, Tensor):
                tensors.append(value.clone())
    for group in opt.param_groups:
        tensors.extend(v.clone() for k, v in sorted(group.items()) if k != "params" and isinstance(v, Tensor))
    return tensors


def make_params(
    shapes: Sequence[tuple[int, ...]], dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[Tensor]:
    """Leaf parameters of the given shapes, deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]


def clone_params(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(param_sets: Sequence[Sequence[Tensor]], seed: int, scale: float = 1.0) -> None:
    """Give every parameter set the same random gradients (seeded per step)."""
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=generator).to(p.dtype) * scale for p in param_sets[0]]
    for params in param_sets:
        for p, g in zip(params, grads):
            p.grad = g.clone()


SHAPES = [(3, 4), (7,), (), (5, 1, 2), (0,)]
"""A matrix, a vector, a scalar, a 3-d tensor and a zero-size parameter (last, as torch does)."""
