"""Regressions for the reliability review (issue 15): no input corrupts memory, state or a
parameter; a failed step writes nothing; the cached plan follows every change the public API
allows; float64 is exact. Each test names the item of the review it pins down."""

from __future__ import annotations

import math

import pytest
import torch

import alr
from helpers import assert_bit_identical, snapshot

FP64_RTOL = 1e-13


def _stepped(backend: str, device: torch.device, n_groups: int = 1, **options) -> tuple[alr.ALROptimizer, list]:
    """An optimizer over ``n_groups`` groups of two parameters, after two steps."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=generator).to(device).requires_grad_() for _ in range(2 * n_groups)]
    groups = [{"params": params[2 * g : 2 * g + 2]} for g in range(n_groups)]
    opt = alr.ALROptimizer(groups, lr=0.1, backend=backend, **options)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(device)
        opt.step()
    return opt, params


def _fresh_grads(params: list) -> None:
    for p in params:
        p.grad = torch.ones_like(p)


# --- 1, 8: bad tensors are rejected, naming the parameter and the tensor --------------------------


def test_resized_parameter_raises_and_writes_nothing(any_backend) -> None:
    """Item 1: ``p.data`` resized after a step no longer fits its state."""
    opt, params = _stepped(*any_backend)
    params[1].data = torch.zeros(4096, device=params[1].device)
    _fresh_grads(params)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' of params\[1\] of param group 0 has shape \[4, 3\]"):
        opt.step()
    for i, (a, b) in enumerate(zip(snapshot(opt, params), before)):
        assert_bit_identical(a, b, f"tensor {i}")


def test_checkpoint_with_a_short_state_tensor_raises(any_backend) -> None:
    """Item 1: a checkpoint whose ``exp_avg`` has 1 element for a 12-element parameter."""
    opt, params = _stepped(*any_backend)
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = torch.zeros(1)
    opt.load_state_dict(saved)
    _fresh_grads(params)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' of params\[0\] of param group 0 has shape \[1\]"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_gradient_of_another_dtype_is_named_as_the_gradient(any_backend, dtype: torch.dtype) -> None:
    """Items 1 and 8: a gradient swapped through ``p.grad.data`` is rejected by every backend
    (torch rejects it too), and the message says it is the gradient."""
    opt, params = _stepped(*any_backend)
    _fresh_grads(params)
    params[1].grad.data = params[1].grad.data.to(dtype)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=rf"the gradient of params\[1\] of param group 0 has dtype {dtype}"):
        opt.step()
    for i, (a, b) in enumerate(zip(snapshot(opt, params), before)):
        assert_bit_identical(a, b, f"tensor {i}")


def test_parameter_cast_after_a_step_names_its_state() -> None:
    """Item 8: part of a model moved to float64 after a step."""
    model = torch.nn.Linear(3, 2)
    opt = alr.ALROptimizer(model.parameters(), backend="cpu")
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    model.weight.data = model.weight.data.double()
    model.weight.grad = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' of params\[0\] of param group 0 has dtype torch.float32"):
        opt.step()


# --- 2: the plan follows every change the public API allows ---------------------------------------


def _torch_and_alr(backend: str, device: torch.device, algorithm: str = "sgd", **options):
    """The same two-parameter model under torch.optim and the alr drop-in of ``algorithm``."""
    make = {"sgd": (torch.optim.SGD, alr.SGD), "adam": (torch.optim.Adam, alr.Adam)}[algorithm]
    pair = []
    for cls, extra in ((make[0], {}), (make[1], {"backend": backend})):
        params = [torch.ones(3, device=device).requires_grad_() for _ in range(2)]
        pair.append((cls(params[:1], lr=0.5, **options, **extra), params))
    return pair


def _step_both(pair, grads) -> None:
    for opt, params in pair:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()


def test_replaced_parameter_list_is_followed(any_backend) -> None:
    """Item 2: ``param_groups[0]["params"] = [new]`` steps the new parameter, not the old."""
    backend, device = any_backend
    pair = _torch_and_alr(backend, device, momentum=0.9)
    _step_both(pair, [torch.ones(3, device=device), None])
    for opt, params in pair:
        opt.param_groups[0]["params"] = [params[1]]
    _step_both(pair, [torch.ones(3, device=device), torch.full((3,), 2.0, device=device)])
    (_, want), (_, got) = pair
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_cleared_state_starts_again(any_backend) -> None:
    """Item 2: ``opt.state[p] = {}`` makes the next step start ``p``'s state afresh."""
    backend, device = any_backend
    pair = _torch_and_alr(backend, device, "adam")
    grad = torch.linspace(-1, 1, 3, device=device)
    _step_both(pair, [grad, None])
    for opt, params in pair:
        opt.state[params[0]] = {}
    _step_both(pair, [grad * 3, None])
    (want_opt, want), (got_opt, got) = pair
    torch.testing.assert_close(got[0], want[0])
    assert float(got_opt.state[got[0]]["step"]) == 1.0
    torch.testing.assert_close(got_opt.state[got[0]]["exp_avg"], want_opt.state[want[0]]["exp_avg"])


def test_state_tensor_replaced_by_hand_is_used(any_backend) -> None:
    """Item 2: ``opt.state[p]["exp_avg"] = t`` is what the next step reads and updates."""
    backend, device = any_backend
    pair = _torch_and_alr(backend, device, "adam")
    grad = torch.linspace(-1, 1, 3, device=device)
    _step_both(pair, [grad, None])
    for opt, params in pair:
        opt.state[params[0]]["exp_avg"] = torch.full((3,), 5.0, device=device)
    _step_both(pair, [grad, None])
    (want_opt, want), (got_opt, got) = pair
    torch.testing.assert_close(got_opt.state[got[0]]["exp_avg"], want_opt.state[want[0]]["exp_avg"])
    torch.testing.assert_close(got[0], want[0])


# --- 3: float64 is exact ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float64_sgd_dampening_matches_torch(backend: str) -> None:
    """Item 3: ``1 − dampening`` stays float64 (it was rounded to float32: 5e-8 off after 10 steps)."""
    generator = torch.Generator().manual_seed(0)
    p = torch.randn(64, generator=generator, dtype=torch.float64).requires_grad_()
    q = p.detach().clone().requires_grad_()
    opt = alr.SGD([p], lr=0.1, momentum=0.9, dampening=0.1, backend=backend)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9, dampening=0.1)
    for _ in range(10):
        grad = torch.randn(64, generator=generator, dtype=torch.float64)
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p, q, rtol=FP64_RTOL, atol=0)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], rtol=FP64_RTOL, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("scale", [1.0, 1e20])
def test_float64_clipping_matches_torch(backend: str, scale: float) -> None:
    """Item 3: the grad norm and clip coefficient of float64 gradients are float64 (a norm
    over ~1.8e19 overflowed float32 and zeroed the update; normal ones had float32 precision)."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(5, 7), (13,), ()]
    ps = [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_() for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = alr.ALROptimizer(ps, lr=0.1, algorithm="sgd", hypergrad="off", max_grad_norm=0.5, backend=backend)
    ref = torch.optim.SGD(qs, lr=0.1)
    for _ in range(3):
        grads = [torch.randn(s, generator=generator, dtype=torch.float64) * scale for s in shapes]
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        want_norm = torch.nn.utils.clip_grad_norm_(qs, 0.5)
        ref.step()
        torch.testing.assert_close(opt.stats().grad_norm, want_norm, rtol=FP64_RTOL, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=FP64_RTOL, atol=0)


# --- 4: a failed step writes nothing ---------------------------------------------------------------


@pytest.mark.parametrize("corrupt", ["state shape", "grad dtype"])
def test_error_in_a_later_group_leaves_earlier_groups_untouched(any_backend, corrupt: str) -> None:
    """Item 4: every bucket is validated before the first kernel runs."""
    opt, params = _stepped(*any_backend, n_groups=3)
    _fresh_grads(params)
    fresh = torch.ones(2, device=params[0].device).requires_grad_()
    opt.add_param_group({"params": [fresh]})  # its state would be created by this step
    fresh.grad = torch.ones_like(fresh)
    if corrupt == "state shape":
        opt.state[params[5]]["exp_avg"] = torch.zeros(5, device=params[5].device)
    else:
        params[5].grad.data = params[5].grad.data.double()
    before, n_states = snapshot(opt, params), len(opt.state)
    with pytest.raises(RuntimeError, match=r"params\[1\] of param group 2"):
        opt.step()
    for i, (a, b) in enumerate(zip(snapshot(opt, params), before)):
        assert_bit_identical(a, b, f"tensor {i}")
    assert len(opt.state) == n_states and fresh not in opt.state


# --- 5, 9: bad constructor arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(hypergrad_lr=math.inf), "Invalid hypergrad_lr"),
        (dict(hypergrad_lr=math.nan), "Invalid hypergrad_lr"),
        (dict(kappa_max=math.inf), "Invalid kappa_max"),
        (dict(lr=math.inf), "Invalid lr"),
        (dict(algorithm="sgd", momentum=math.nan), "Invalid momentum"),
        (dict(algorithm="sgd", momentum=0.9, dampening=math.nan), "Invalid dampening"),
        (dict(betas=(0.9, math.nan)), "Invalid beta"),
        (dict(eps=math.inf), "Invalid eps"),
        (dict(weight_decay=math.nan), "Invalid weight_decay"),
        (dict(max_grad_norm=math.inf), "Invalid max_grad_norm"),
    ],
)
def test_nonfinite_hyper_parameters_are_rejected(options: dict, message: str) -> None:
    """Item 5: an inf or nan hyper-parameter (torch accepts some) turns κ and the parameters
    into NaN within two steps, past the nonfinite skip."""
    with pytest.raises(ValueError, match=message):
        alr.ALROptimizer([torch.ones(2, requires_grad=True)], backend="reference", **options)


def test_duplicate_parameters_in_a_group_are_rejected() -> None:
    """Item 9: twice in one group, a parameter would be stepped twice per step."""
    p = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"same tensor twice \(params\[0\] and params\[2\]\)"):
        alr.ALROptimizer([p, torch.ones(1, requires_grad=True), p], backend="reference")


# --- 6: 16-bit masters without other state ---------------------------------------------------------


def test_float16_master_weights_in_a_stateless_sgd_group(any_backend) -> None:
    """Item 6: fp16 parameters with ``master_weights`` in an SGD group without momentum."""
    backend, device = any_backend
    results = []
    for name in ("reference", backend):
        p = torch.linspace(-1, 1, 7, dtype=torch.float16, device=device).requires_grad_()
        opt = alr.ALROptimizer([p], lr=0.1, algorithm="sgd", master_weights=True, hypergrad="off", backend=name)
        for _ in range(3):
            p.grad = torch.full_like(p, 0.01)
            opt.step()
        results.append((p.detach().clone(), opt.state[p]["master_param"].clone()))
    (want_p, want_master), (got_p, got_master) = results
    assert_bit_identical(got_p, want_p, "param")
    assert_bit_identical(got_master, want_master, "master_param")
    assert got_master.dtype == torch.float32 and not torch.equal(got_master, torch.linspace(-1, 1, 7))


# --- 7: bad state dicts raise at load, before anything is replaced ---------------------------------


def _bad_alr_entries():
    yield "missing skipped_steps", lambda entry: entry.pop("skipped_steps"), r"'alr' entry must hold"
    yield "str skipped_steps", lambda entry: entry.update(skipped_steps="x"), r"'alr'\['skipped_steps'\] must be"
    yield "tensor of 3", lambda entry: entry.update(grad_norm=torch.ones(3)), r"'alr'\['grad_norm'\] must be"


@pytest.mark.parametrize("case, corrupt, message", list(_bad_alr_entries()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_alr_entry_raises_at_load_and_changes_nothing(case: str, corrupt, message: str) -> None:
    opt, params = _stepped("reference", torch.device("cpu"), skip_nonfinite=True)
    saved = opt.state_dict()
    corrupt(saved["alr"])
    before, skipped = snapshot(opt, params), opt.stats().skipped_steps.clone()
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    for i, (a, b) in enumerate(zip(snapshot(opt, params), before)):
        assert_bit_identical(a, b, f"tensor {i}")
    assert_bit_identical(opt.stats().skipped_steps, skipped, "skipped_steps")
    _fresh_grads(params)
    opt.step()


def test_state_dict_of_another_algorithm_is_rejected() -> None:
    """Item 7: an SGD state dict does not load into Adam, nor Adam's into SGD."""
    p = torch.ones(3, requires_grad=True)
    sgd = alr.ALROptimizer([p], algorithm="sgd", momentum=0.9, backend="reference")
    adam = alr.ALROptimizer([p], algorithm="adam", backend="reference")
    p.grad = torch.ones(3)
    sgd.step()
    adam.step()
    with pytest.raises(ValueError, match=r"holds 'momentum_buffer', which sgd keeps and adam does not"):
        alr.ALROptimizer([p], algorithm="adamw", backend="reference").load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match=r"holds 'exp_avg', which adam keeps and sgd does not"):
        alr.ALROptimizer([p], algorithm="sgd", backend="reference").load_state_dict(adam.state_dict())


@pytest.mark.parametrize("step", [-3.0, math.nan, math.inf, "two"])
def test_bad_saved_step_is_rejected(step) -> None:
    """Item 7: a negative step made NaN; torch raises too."""
    opt, params = _stepped("reference", torch.device("cpu"))
    saved = opt.state_dict()
    saved["state"][1]["step"] = torch.tensor(step) if isinstance(step, float) else step
    with pytest.raises(ValueError, match=r"saved step of params\[1\] of param group 0"):
        opt.load_state_dict(saved)


@pytest.mark.parametrize("change", ["resized", "cast"])
def test_state_tensor_data_swapped_by_hand_is_validated(any_backend, change: str) -> None:
    """Item 2: ``opt.state[p]["exp_avg"].data = ...`` keeps the tensor object but changes its
    shape or dtype: the next step validates it again instead of overrunning it."""
    opt, params = _stepped(*any_backend)
    exp_avg = opt.state[params[0]]["exp_avg"]
    exp_avg.data = torch.zeros(5, device=exp_avg.device) if change == "resized" else exp_avg.data.half()
    _fresh_grads(params)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' of params\[0\] of param group 0 has"):
        opt.step()


def test_parameter_list_edited_in_place_is_followed() -> None:
    """Item 2: ``param_groups[0]["params"][0] = q`` (the list object kept)."""
    p, q = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = alr.SGD([p], lr=1.0, backend="cpu")
    p.grad = torch.ones(2)
    opt.step()
    opt.param_groups[0]["params"][0] = q
    p.grad, q.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert p.tolist() == [0.0, 0.0] and q.tolist() == [0.0, 0.0]
