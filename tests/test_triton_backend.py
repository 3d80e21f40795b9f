"""What is particular to the ``triton`` backend: backend resolution, one launch per bucket
whatever the tensor count, device tables that follow replaced storage, its custom ops.

The kernels run on CUDA tensors when a GPU is present, else on CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1``, set by tests/run.sh). Their parity with the
reference, option by option, is in test_backend_parity.py.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import alr
from alr import _triton, backends
from helpers import assert_optimizer_state_close
from parity import CONFIGS, assert_kappa_close, make_pair, set_same_grads, typed_params

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def triton_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not _triton.interpreted():
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1 (tests/run.sh sets it)")
    return torch.device("cpu")


# --- resolution ------------------------------------------------------------------------------------


def test_explicit_triton_resolves_and_rejects_float64(triton_device: torch.device) -> None:
    assert backends.resolve("triton", triton_device, torch.bfloat16) is _triton
    p = torch.zeros(3, dtype=torch.float64, device=triton_device, requires_grad=True)
    message = r"backend='triton' takes float32, bfloat16, float16 parameters, but a parameter is torch.float64"
    with pytest.raises(ValueError, match=message):
        alr.ALROptimizer([p], backend="triton")


def test_auto_never_picks_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("ALR_BACKEND", raising=False)
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) is not _triton


# --- launches ------------------------------------------------------------------------------------


class _CountingKernels:
    """Stands in for ``alr.kernels.step``: counts each kernel's launches."""

    def __init__(self, module) -> None:
        self._module, self.launches = module, Counter()

    def __getattr__(self, name: str):
        kernel = getattr(self._module, name)
        counts = self.launches

        class Launcher:
            def __getitem__(self, grid):
                counts[name] += 1
                return kernel[grid]

        return Launcher()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("adamw", {"adam_kernel": 1}),
        ("adamw-mult-group", {"grad_stats_kernel": 1, "adam_kernel": 1, "sum_chunks_kernel": 2}),
        ("adam-add-exact-amsgrad-clip", {"grad_stats_kernel": 1, "adam_kernel": 2, "sum_chunks_kernel": 2}),
        ("sgd-nesterov-mult-clip-maximize", {"grad_stats_kernel": 1, "sgd_kernel": 1, "sum_chunks_kernel": 2}),
    ],
)
def test_one_launch_per_bucket_whatever_the_tensor_count(
    triton_device: torch.device, monkeypatch: pytest.MonkeyPatch, config: str, expected: dict
) -> None:
    """100 tensors of one (device, dtype) and a 3,000-element one (several chunks): each
    kernel the options need runs once per step (exact-HD runs the Adam kernel twice:
    statistics first, then the update; the nonfinite check, on by default, is the
    grad_stats pre-pass)."""
    counting = _CountingKernels(_triton._step_module())
    monkeypatch.setattr(_triton, "_step_module", lambda: counting)
    shapes = [(3000,)] + [(7,)] * 100
    ps, opt, qs, ref = make_pair("triton", lambda: typed_params(shapes, torch.float32, device=triton_device), CONFIGS[config])
    set_same_grads([ps, qs], seed=0)
    opt.step()
    assert dict(counting.launches) == expected
    ref.step()
    assert_optimizer_state_close(opt, ps[:2], ref, qs[:2])


# --- tables follow the storage -----------------------------------------------------------------------


def _step_both(ps, opt, qs, ref, seed: int) -> None:
    set_same_grads([ps, qs], seed=seed)
    opt.step()
    ref.step()
    assert_optimizer_state_close(opt, ps, ref, qs)
    assert_kappa_close(opt, ref)


def test_replaced_parameter_storage_is_followed(triton_device: torch.device) -> None:
    """``p.data = ...`` gives the parameter new storage between steps: the kernel must
    update the new storage, not the old address its pointer table held."""
    make = lambda: typed_params([(5, 4), (1500,)], torch.float32, device=triton_device)
    ps, opt, qs, ref = make_pair("triton", make, CONFIGS["adamw-mult-group"])
    _step_both(ps, opt, qs, ref, seed=0)
    old = ps[1].data
    for params in (ps, qs):
        params[1].data = params[1].data * 0.5 + 1.0
    _step_both(ps, opt, qs, ref, seed=1)
    assert not torch.equal(ps[1].detach(), old)


def test_loaded_state_dict_replaces_state_tensors_and_is_followed(triton_device: torch.device) -> None:
    """load_state_dict gives every state entry new storage: the next step updates it."""
    make = lambda: typed_params([(6,), (2100,)], torch.float32, device=triton_device)
    ps, opt, qs, ref = make_pair("triton", make, CONFIGS["sgd-momentum-mult"])
    _step_both(ps, opt, qs, ref, seed=0)
    buffers_before = [opt.state[p]["momentum_buffer"] for p in ps]
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # a copy: loading keeps tensors as they are
    assert all(opt.state[p]["momentum_buffer"] is not b for p, b in zip(ps, buffers_before))
    for p, q in zip(ps, qs):
        p.data.copy_(q.detach())
    _step_both(ps, opt, qs, ref, seed=1)


def test_device_tables_are_reused_for_the_same_pointers(triton_device: torch.device) -> None:
    _triton._device_table.cache_clear()
    _triton._chunks.cache_clear()
    ps, opt, qs, ref = make_pair("triton", lambda: typed_params([(8,), (9,)], torch.float32, device=triton_device), CONFIGS["adamw"])
    grads = [torch.randn_like(p) for p in ps]
    for _ in range(3):
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
    tables, chunks = _triton._device_table.cache_info(), _triton._chunks.cache_info()
    # Built on the first step: four chunk tables, the state and the gradient pointers;
    # found on the next two.
    assert (tables.currsize, tables.misses, tables.hits) == (6, 6, 2 * 2)
    assert (chunks.misses, chunks.hits) == (1, 2)


# --- ops -----------------------------------------------------------------------------------------


def test_custom_ops_pass_opcheck(triton_device: torch.device) -> None:
    hyper = alr.bucket.GroupHyper("adam", 0.01, 0.1, False, decoupled_weight_decay=True, amsgrad=True, hypergrad="mult")
    params = typed_params([(5, 3), (1100,)], torch.float32, device=triton_device)
    like = lambda scale: [torch.randn_like(p) * scale for p in params]
    lists = (
        [p.detach() for p in params], like(1.0), [torch.tensor(2.0, device=triton_device) for _ in params],
        like(0.1), [v.abs() for v in like(0.01)], [v.abs() for v in like(0.02)],
        [p.detach().float() for p in params],  # master weights (a no-op copy for fp32)
    )  # fmt: skip
    scale, clip, skip = (torch.tensor(v, device=triton_device) for v in (4.0, 0.5, False))
    alphas = torch.full((2,), 0.01, dtype=torch.float64, device=triton_device)
    scalars = hyper.declaration.tensor_scalars(hyper, torch.stack(lists[2]).double(), alphas).float()
    options = hyper.declaration.kernel_arguments(hyper)
    torch.library.opcheck(torch.ops.alr.triton_grad_stats.default, (lists[1], scale))
    torch.library.opcheck(torch.ops.alr.triton_adam_hypergrad_stats.default, (*lists, scalars, scale, clip), options)
    update_args = (*lists, [], scalars, scale, clip, skip)  # no rounding keys
    torch.library.opcheck(torch.ops.alr.triton_adam_update_.default, update_args, {**options, "collect_stats": True})
