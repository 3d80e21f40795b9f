"""Parity of a native backend with the reference backend: shared by the backend tests.

A parity run steps ``ALROptimizer(backend=<backend>)`` and ``ALROptimizer(backend=
"reference")`` on identical clones and compares the parameters, every state entry and κ
after every step with ``helpers``' one tolerance rule.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import alr
from helpers import assert_optimizer_state_close, assert_tensors_close

STEPS = 7

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)]

ADAM = {
    "adamw": dict(algorithm="adamw", hypergrad="off", skip_nonfinite=False),
    "adamw-wd-amsgrad-maximize": dict(algorithm="adamw", weight_decay=0.1, amsgrad=True, maximize=True, hypergrad="off"),
    "adam-coupled-wd": dict(algorithm="adam", weight_decay=0.1, hypergrad="off"),
    # 1 - beta1 = 0.7 takes the other branch of torch's lerp.
    "adam-amsgrad-beta1-0.3": dict(algorithm="adam", amsgrad=True, betas=(0.3, 0.99), hypergrad="off"),
    "adamw-mult-group": dict(algorithm="adamw", hypergrad="mult", hypergrad_lr=0.05),
    "adamw-mult-tensor-exact": dict(algorithm="adamw", hypergrad="mult", hypergrad_lr=0.05, hypergrad_scope="tensor", hypergrad_exact=True),
    "adam-add-tensor-wd": dict(algorithm="adam", weight_decay=0.05, hypergrad="add", hypergrad_lr=1e-4, hypergrad_scope="tensor"),
    "adam-add-exact-amsgrad-clip": dict(algorithm="adam", amsgrad=True, hypergrad="add", hypergrad_lr=1e-4, hypergrad_exact=True, max_grad_norm=1.0),
    "adamw-mult-clip-maximize": dict(algorithm="adamw", maximize=True, max_grad_norm=0.5, hypergrad="mult", hypergrad_lr=0.05),
}
SGD = {
    "sgd-plain": dict(algorithm="sgd", hypergrad="off"),
    "sgd-plain-mult-wd": dict(algorithm="sgd", weight_decay=0.05, hypergrad="mult", hypergrad_lr=0.05),
    "sgd-momentum": dict(algorithm="sgd", momentum=0.9, hypergrad="off"),
    "sgd-momentum-mult": dict(algorithm="sgd", momentum=0.9, hypergrad="mult", hypergrad_lr=0.05),
    "sgd-dampening-wd": dict(algorithm="sgd", momentum=0.9, dampening=0.3, weight_decay=0.05, hypergrad="off"),
    "sgd-dampening-add-exact-tensor": dict(
        algorithm="sgd", momentum=0.9, dampening=0.3, hypergrad="add", hypergrad_lr=1e-3, hypergrad_exact=True, hypergrad_scope="tensor"
    ),
    "sgd-nesterov-mult-clip-maximize": dict(
        algorithm="sgd", momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True, max_grad_norm=1.0, hypergrad="mult", hypergrad_lr=0.05
    ),
    "sgd-nesterov-exact": dict(algorithm="sgd", momentum=0.9, nesterov=True, hypergrad="mult", hypergrad_lr=0.05, hypergrad_exact=True),
}
CONFIGS = {**ADAM, **SGD}
LR = {"adam": 1e-2, "sgd": 5e-2}


def lr_for(options: dict) -> float:
    return LR["sgd" if options["algorithm"] == "sgd" else "adam"]


def skip_unsupported_dtype(backend: str, dtype: torch.dtype) -> None:
    """Skip the test for a dtype the backend does not take (the GPU backends: no float64)."""
    if backend != "cpu" and dtype == torch.float64:
        pytest.skip(f"the {backend} backend takes 16- and 32-bit parameters")


def make_pair(backend: str, make_params, options: dict) -> tuple[list[Tensor], torch.optim.Optimizer, list[Tensor], torch.optim.Optimizer]:
    """The same parameters (layouts included) under ``backend`` and under the reference."""
    ps, qs = make_params(), make_params()
    options = {"lr": lr_for(options), **options}
    return ps, alr.ALROptimizer(ps, backend=backend, **options), qs, alr.ALROptimizer(qs, backend="reference", **options)


def typed_params(shapes, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu") -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def set_same_grads(param_sets, seed: int, scale: float = 1.0, like_param: bool = True, poison=None) -> None:
    """Identical random gradients for every set; in the parameter's layout unless like_param=False."""
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(p.shape, generator=generator).to(p.dtype) * scale for p in param_sets[0]]
    if poison is not None:
        index, value = poison
        values[index].view(-1)[0] = value
    for params in param_sets:
        for p, v in zip(params, values):
            p.grad = torch.empty_like(p).copy_(v) if like_param else v.to(p.device, copy=True)


def assert_kappa_close(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.stats(), b.stats()
    for ka, kb in zip(sa.kappa, sb.kappa):
        assert_tensors_close(ka, kb, "kappa")
    if not (sa.grad_norm.isnan() and sb.grad_norm.isnan()):  # NaN until a pre-pass ran
        assert_tensors_close(sa.grad_norm, sb.grad_norm, "grad_norm")
    assert torch.equal(sa.skipped_steps, sb.skipped_steps)


def assert_all_close(opt, ps, ref, qs) -> None:
    """assert_optimizer_state_close's comparison, batched: one concatenated tensor per state
    key (same dtype, same tolerance), so hundreds of tensors cost one comparison."""
    assert_tensors_close(torch.cat([p.detach().reshape(-1) for p in ps]), torch.cat([q.detach().reshape(-1) for q in qs]), "params")
    for key in ref.state[qs[0]]:
        expected = [ref.state[q][key] for q in qs]
        actual = [opt.state[p][key] for p in ps]
        if key == "step":
            assert [float(a) for a in actual] == [float(e) for e in expected]
        else:
            assert_tensors_close(torch.cat([a.reshape(-1) for a in actual]), torch.cat([e.reshape(-1) for e in expected]), key)


def run_parity(backend: str, make_params, options: dict, steps: int = STEPS, grad_scale: float = 1.0, like_param: bool = True):
    ps, opt, qs, ref = make_pair(backend, make_params, options)
    for step in range(steps):
        set_same_grads([ps, qs], seed=step, scale=grad_scale, like_param=like_param)
        opt.step()
        ref.step()
        if len(ps) > 20:
            # Hundreds of small tensors: batched every step, one by one for the others.
            assert_all_close(opt, ps, ref, qs)
            special = [i for i, p in enumerate(ps) if not (p.dim() == 1 and 0 < p.numel() < 200)]
            assert_optimizer_state_close(opt, [ps[i] for i in special], ref, [qs[i] for i in special])
        else:
            assert_optimizer_state_close(opt, ps, ref, qs)
        assert_kappa_close(opt, ref)
    return ps, opt


def layout_params(dtype: torch.dtype, device: str | torch.device = "cpu") -> list[Tensor]:
    """Zero-size, scalar, odd sizes, larger than a chunk, ~300 small tensors whose packing
    crosses task boundaries, a transposed leaf, a channels-last leaf, a non-dense leaf."""
    generator = torch.Generator().manual_seed(1)
    small = [(int(n),) for n in torch.randint(1, 200, (300,), generator=generator)]
    shapes = [(0,), (), (4097,), (1024, 33), (40_000,), *small]
    params = typed_params(shapes, dtype, seed=2, device=device)
    transposed = torch.randn(33, 20, generator=generator).to(device=device, dtype=dtype).t()
    channels_last = (
        torch.randn(2, 3, 5, 4, generator=generator).to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    )
    strided = torch.randn(9, 16, generator=generator).to(device=device, dtype=dtype)[:, ::2]
    return params + [t.detach().requires_grad_() for t in (transposed, channels_last, strided)]
