"""A step never reads a tensor's value on the host (no ``.item()``, ``bool(t)``, ``.cpu()``).

On CPU there is no device to wait for, so the test makes every host read raise while
``step()`` runs: a read would be a synchronisation on an accelerator.
"""

from __future__ import annotations

import pytest
import torch

import alr
from helpers import make_params, set_grads
from parity import set_same_grads, typed_params

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def no_host_reads(monkeypatch: pytest.MonkeyPatch):
    """While active, reading a tensor's value on the host raises."""

    def forbid(name: str):
        def read(*args, **kwargs):
            raise AssertionError(f"host read Tensor.{name} during step()")

        return read

    def activate() -> None:
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, forbid(name))

    return activate


CONFIGS = {
    "adamw-defaults": dict(algorithm="adamw"),
    "adam-exact-tensor-scope-clip": dict(
        algorithm="adam", hypergrad_exact=True, hypergrad_scope="tensor", max_grad_norm=0.5,
        weight_decay=0.1, amsgrad=True,
    ),
    "adamw-add-tensor-lr": dict(algorithm="adamw", hypergrad="add", lr=torch.tensor(0.1)),
    "sgd-nesterov": dict(algorithm="sgd", momentum=0.9, nesterov=True, max_grad_norm=1.0),
    "sgd-dampening-first-step": dict(algorithm="sgd", momentum=0.9, dampening=0.3),
    "sgd-plain-tensor-scope": dict(algorithm="sgd", hypergrad_scope="tensor"),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_step_reads_nothing_on_the_host(config, no_host_reads) -> None:
    params = make_params([(4, 3), (5,), (0,)]) + make_params([(2, 2)], dtype=torch.bfloat16)
    before = [p.detach().clone() for p in params]
    # lr 0.1: a bf16 parameter near 1 must visibly move (its spacing there is 2^-7).
    opt = alr.ALROptimizer(params, **{"lr": 0.1, "backend": "reference", **config})
    set_grads([params], seed=1)
    opt.step()
    set_grads([params], seed=2)
    no_host_reads()
    opt.step()
    changed = [not torch.equal(p.detach(), b) for p, b in zip(params, before) if p.numel()]
    assert all(changed)


@pytest.mark.cuda
def test_gpu_backends_never_synchronise(backend: str, device: torch.device) -> None:
    """On a GPU, every synchronising CUDA call raises under ``set_sync_debug_mode("error")``."""
    if device.type != "cuda":
        pytest.skip(f"{backend} runs on {device} here")
    params = typed_params([(64, 33), (33,), (4097,)], torch.float32, device=device)
    opt = alr.ALROptimizer(params, lr=0.01, backend=backend, max_grad_norm=1.0, hypergrad_scope="tensor")
    for seed in range(2):  # the first steps build state and device tables
        set_same_grads([params], seed=seed)
        opt.step()
    set_same_grads([params], seed=2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
