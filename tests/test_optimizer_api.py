"""The optimizer API: torch's validation, ALR's own checks, backends and torch.optim behaviour."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import alr
import alr.backends
import alr.reference
from helpers import (
    SHAPES,
    assert_bit_identical,
    assert_optimizer_state_close,
    assert_tensors_close,
    clone_params,
    make_params,
    set_grads,
    snapshot,
)


def _param(*shape: int) -> Tensor:
    return torch.randn(*shape or (3,)).requires_grad_()


def _raised(make: Callable[[], object]) -> BaseException:
    with pytest.raises(Exception) as info:
        make()
    return info.value


# ---------------------------------------------------------------------------------------
# Invalid arguments: the same exception type and message as torch.optim
# ---------------------------------------------------------------------------------------


def _one_param() -> list[Tensor]:
    return [_param()]


def _same_param_in_two_groups() -> list[dict]:
    shared = _param()
    return [{"params": [shared]}, {"params": [shared]}]


def _non_leaf() -> list[Tensor]:
    return [_param() * 2]


# (case, optimizer name, params factory, keyword arguments)
_INVALID = [
    ("negative_lr", "Adam", _one_param, {"lr": -1}),
    ("negative_lr", "AdamW", _one_param, {"lr": -1}),
    ("negative_lr", "SGD", _one_param, {"lr": -1}),
    ("negative_eps", "Adam", _one_param, {"eps": -1e-8}),
    ("negative_eps", "AdamW", _one_param, {"eps": -1e-8}),
    ("beta0_is_1", "Adam", _one_param, {"betas": (1.0, 0.999)}),
    ("beta1_is_1", "Adam", _one_param, {"betas": (0.9, 1.0)}),
    ("negative_beta1", "AdamW", _one_param, {"betas": (0.9, -0.1)}),
    ("mixed_float_tensor_betas", "Adam", _one_param, {"betas": (torch.tensor(0.9), 0.999)}),
    ("integer_beta", "Adam", _one_param, {"betas": (0, 0.999)}),
    ("negative_weight_decay", "Adam", _one_param, {"weight_decay": -0.1}),
    ("negative_weight_decay", "AdamW", _one_param, {"weight_decay": -0.1}),
    ("negative_weight_decay", "SGD", _one_param, {"weight_decay": -0.1}),
    ("negative_momentum", "SGD", _one_param, {"momentum": -0.9}),
    ("nesterov_without_momentum", "SGD", _one_param, {"nesterov": True}),
    ("nesterov_with_dampening", "SGD", _one_param, {"momentum": 0.9, "dampening": 0.1, "nesterov": True}),
    ("two_element_tensor_lr", "Adam", _one_param, {"lr": torch.tensor([0.1, 0.2])}),
    ("two_element_tensor_lr", "SGD", _one_param, {"lr": torch.tensor([0.1, 0.2])}),
    ("tensor_lr_with_foreach", "Adam", _one_param, {"lr": torch.tensor(0.1), "foreach": True}),
    ("tensor_lr_with_foreach", "AdamW", _one_param, {"lr": torch.tensor(0.1), "foreach": True}),
    ("fused_and_foreach", "Adam", _one_param, {"fused": True, "foreach": True}),
    ("fused_and_foreach", "SGD", _one_param, {"fused": True, "foreach": True}),
    ("empty_parameter_list", "Adam", lambda: [], {}),
    ("empty_parameter_list", "SGD", lambda: [], {}),
    ("param_in_two_groups", "AdamW", _same_param_in_two_groups, {}),
    ("param_in_two_groups", "SGD", _same_param_in_two_groups, {}),
    ("non_leaf_tensor", "Adam", _non_leaf, {}),
    ("non_leaf_tensor", "SGD", _non_leaf, {}),
    ("params_is_a_tensor", "Adam", lambda: _param(), {}),
]


@pytest.mark.parametrize(
    ("name", "params", "kwargs"),
    [pytest.param(name, params, kwargs, id=f"{name}-{case}") for case, name, params, kwargs in _INVALID],
)
def test_invalid_arguments_raise_like_torch(name, params, kwargs) -> None:
    expected = _raised(lambda: getattr(torch.optim, name)(params(), **kwargs))
    actual = _raised(lambda: getattr(alr, name)(params(), **kwargs))
    assert type(actual) is type(expected)
    assert str(actual) == str(expected)


# ---------------------------------------------------------------------------------------
# ALR-specific validation
# ---------------------------------------------------------------------------------------


def test_integer_parameter_is_a_type_error_naming_the_dtype() -> None:
    with pytest.raises(TypeError, match=r"torch\.int64"):
        alr.AdamW([torch.zeros(3, dtype=torch.int64)])


def test_complex_parameter_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="complex"):
        alr.Adam([torch.randn(3, dtype=torch.complex64, requires_grad=True)])


def test_sparse_gradient_names_the_parameter_and_changes_nothing() -> None:
    weight, bias = _param(4, 3), _param(3)
    opt = alr.Adam([("layer.weight", weight), ("layer.bias", bias)], lr=0.1, backend="reference")
    before = [weight.detach().clone(), bias.detach().clone()]
    weight.grad = torch.randn(4, 3)
    bias.grad = torch.randn(3).to_sparse()

    with pytest.raises(RuntimeError, match=r"sparse.*layer\.bias"):
        opt.step()

    assert_bit_identical(weight.detach(), before[0], "weight")
    assert_bit_identical(bias.detach(), before[1], "bias")
    assert all(float(state["step"]) == 0 for state in opt.state.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"hypergrad": "mul"}, "Invalid hypergrad: 'mul'", id="hypergrad"),
        pytest.param({"hypergrad_scope": "layer"}, "Invalid hypergrad_scope: 'layer'", id="hypergrad_scope"),
        pytest.param({"hypergrad_lr": -0.1}, "Invalid hypergrad_lr", id="negative_hypergrad_lr"),
        pytest.param({"hypergrad_norm_decay": 1.0}, "Invalid hypergrad_norm_decay", id="hypergrad_norm_decay_one"),
        pytest.param({"kappa_min": 2.0, "kappa_max": 1.0}, "Invalid kappa bounds", id="kappa_min_above_max"),
        pytest.param({"kappa_min": -1.0}, "Invalid kappa bounds", id="negative_kappa_min"),
        pytest.param({"backend": "gpu"}, "Invalid backend: 'gpu'", id="backend_name"),
        pytest.param({"algorithm": "adagrad"}, "Invalid algorithm: 'adagrad'", id="algorithm"),
        pytest.param({"max_grad_norm": 0.0}, "Invalid max_grad_norm", id="max_grad_norm"),
        pytest.param({"backend": "cuda"}, "backend='cuda' runs on cuda tensors", id="cuda_backend_with_cpu_params"),
    ],
)
def test_invalid_alr_options_raise_value_error(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        alr.ALROptimizer([_param()], **kwargs)


def test_invalid_option_in_added_group_leaves_optimizer_unchanged() -> None:
    opt = alr.ALROptimizer([_param()], backend="reference")
    with pytest.raises(ValueError, match="hypergrad"):
        opt.add_param_group({"params": [_param()], "hypergrad": "bogus"})
    assert len(opt.param_groups) == 1


def test_differentiable_is_rejected() -> None:
    with pytest.raises(RuntimeError, match="differentiable"):
        alr.Adam([_param()], differentiable=True)


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------


def _one_step(opt: torch.optim.Optimizer, params: list[Tensor], seed: int = 0) -> None:
    set_grads([params], seed)
    opt.step()


def test_reference_backend_is_always_available() -> None:
    assert "reference" in alr.available_backends()


def test_unavailable_explicit_backend_raises_at_step_with_the_reason() -> None:
    reason = alr.backends.backend_unavailable_reason("cpu")
    if reason is None:
        pytest.skip("the cpu backend is built here")
    params = make_params(SHAPES)
    opt = alr.AdamW(params, backend="cpu")
    before = [p.detach().clone() for p in params]
    set_grads([params], 0)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    assert reason in str(info.value)
    assert "'cpu'" in str(info.value)
    for index, (now, then) in enumerate(zip(params, before)):
        assert_bit_identical(now.detach(), then, f"params[{index}]")
    assert all(float(state["step"]) == 0 for state in opt.state.values())


def test_alr_backend_environment_variable_is_honoured(monkeypatch) -> None:
    """``ALR_BACKEND`` replaces "auto": "reference" runs it without a fallback warning,
    an unavailable backend raises, and an unknown name is a ValueError."""
    monkeypatch.setattr(alr.backends, "_warned_fallbacks", set())
    reference_updates = []
    real_update = alr.reference.update

    def counting_update(*args, **kwargs):
        reference_updates.append(1)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(alr.reference, "update", counting_update)
    params = make_params(SHAPES)
    opt = alr.AdamW(params, lr=0.1)
    before = [p.detach().clone() for p in params]

    monkeypatch.setenv("ALR_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _one_step(opt, params)
    assert reference_updates == [1]
    assert not torch.equal(params[0].detach(), before[0])

    if alr.backends.backend_unavailable_reason("cpu") is not None:
        monkeypatch.setenv("ALR_BACKEND", "cpu")
        with pytest.raises(RuntimeError, match="'cpu'"):
            _one_step(opt, params, seed=1)

    monkeypatch.setenv("ALR_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        _one_step(opt, params, seed=2)


def _fallback_warnings(record: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, alr.ALRBackendFallbackWarning)]


@pytest.fixture
def fresh_fallback_state(monkeypatch) -> str:
    """No ALR_BACKEND and no fallback warned yet; returns why the cpu backend is missing."""
    reason = alr.backends.backend_unavailable_reason("cpu")
    if reason is None:
        pytest.skip("the cpu backend is built here, so auto does not fall back")
    monkeypatch.delenv("ALR_BACKEND", raising=False)
    monkeypatch.setattr(alr.backends, "_warned_fallbacks", set())
    return reason


def test_auto_fallback_warns_exactly_once(fresh_fallback_state) -> None:
    adam_params, sgd_params = make_params(SHAPES), make_params(SHAPES, seed=1)
    runs = [(alr.AdamW(adam_params), adam_params), (alr.SGD(sgd_params, lr=0.1, momentum=0.9), sgd_params)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(3):
            for opt, params in runs:
                _one_step(opt, params, step)
    fallbacks = _fallback_warnings(record)
    assert len(fallbacks) == 1
    message = str(fallbacks[0].message)
    assert fresh_fallback_state in message
    assert "'reference'" in message


def test_auto_fallback_warning_points_at_the_callers_step(fresh_fallback_state) -> None:
    """The warning is attributed to the user's ``opt.step()`` line, not to alr's internals."""
    params = make_params(SHAPES)
    opt = alr.AdamW(params)
    set_grads([params], 0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt.step()
    (fallback,) = _fallback_warnings(record)
    assert fallback.filename == __file__, f"attributed to {fallback.filename}:{fallback.lineno}"


# ---------------------------------------------------------------------------------------
# torch.optim behaviour
# ---------------------------------------------------------------------------------------


def test_add_param_group_takes_defaults_and_trains() -> None:
    first, second = make_params([(3, 4)], seed=0), make_params([(5,), (2, 2)], seed=1)
    torch_first, torch_second = clone_params(first), clone_params(second)
    opt = alr.AdamW(first, lr=0.02, weight_decay=0.1, amsgrad=True, backend="reference")
    ref = torch.optim.AdamW(torch_first, lr=0.02, weight_decay=0.1, amsgrad=True, foreach=False)
    opt.add_param_group({"params": second, "lr": 0.05})
    ref.add_param_group({"params": torch_second, "lr": 0.05})

    added = opt.param_groups[1]
    assert added["lr"] == 0.05
    for key, default in opt.defaults.items():
        if key != "lr":
            assert added[key] == default, key

    params, torch_params = first + second, torch_first + torch_second
    initial = [p.detach().clone() for p in second]
    for step in range(5):
        set_grads([params, torch_params], step)
        opt.step()
        ref.step()
        assert_optimizer_state_close(opt, params, ref, torch_params)
    for before, after in zip(initial, second):
        assert not torch.equal(before, after.detach())


@pytest.mark.parametrize("set_to_none", [None, True, False], ids=["default", "set_to_none", "zero_fill"])
def test_zero_grad(set_to_none) -> None:
    params = make_params(SHAPES)
    opt = alr.SGD(params, lr=0.1)
    set_grads([params], 0)
    grads = [p.grad for p in params]
    if set_to_none is None:
        opt.zero_grad()
    else:
        opt.zero_grad(set_to_none=set_to_none)
    if set_to_none is False:
        for p, grad in zip(params, grads):
            assert p.grad is grad
            assert torch.count_nonzero(p.grad) == 0
    else:
        assert all(p.grad is None for p in params)


def test_closure_loss_is_returned_and_evaluated_with_grad() -> None:
    model = nn.Linear(4, 2)
    inputs = torch.randn(8, 4)
    opt = alr.AdamW(model.parameters(), lr=0.1, backend="reference")
    seen = []

    def closure() -> Tensor:
        opt.zero_grad()
        loss = model(inputs).square().mean()
        loss.backward()
        seen.append((torch.is_grad_enabled(), loss))
        return loss

    before = model.weight.detach().clone()
    with torch.no_grad():
        returned = opt.step(closure)
    assert len(seen) == 1
    grad_enabled, loss = seen[0]
    assert grad_enabled
    assert returned is loss
    assert not torch.equal(model.weight.detach(), before)
    assert opt.step() is None


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_named_parameters_give_param_names_like_torch() -> None:
    model = _mlp()
    torch_model = copy.deepcopy(model)
    opt = alr.AdamW(model.named_parameters(), lr=0.1, backend="reference")
    ref = torch.optim.AdamW(torch_model.named_parameters(), lr=0.1)
    for optimizer, net in ((opt, model), (ref, torch_model)):
        net(torch.randn(5, 3)).sum().backward()
        optimizer.step()

    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert opt.param_groups[0]["param_names"] == names
    state_dict, torch_state_dict = opt.state_dict(), ref.state_dict()
    assert state_dict["param_groups"][0]["param_names"] == torch_state_dict["param_groups"][0]["param_names"]
    assert state_dict["param_groups"][0]["params"] == torch_state_dict["param_groups"][0]["params"]
    assert state_dict["state"].keys() == torch_state_dict["state"].keys()


def test_step_hooks_run_once_per_step_in_order() -> None:
    params = make_params(SHAPES)
    opt = alr.AdamW(params, lr=0.1, backend="reference")
    events: list[tuple[str, Tensor]] = []

    def pre_hook(optimizer, args, kwargs) -> None:
        assert optimizer is opt
        events.append(("pre", params[0].detach().clone()))

    def post_hook(optimizer, args, kwargs) -> None:
        assert optimizer is opt
        events.append(("post", params[0].detach().clone()))

    handles = [opt.register_step_pre_hook(pre_hook), opt.register_step_post_hook(post_hook)]
    for step in range(3):
        set_grads([params], step)
        before = params[0].detach().clone()
        opt.step()
        (pre_name, at_pre), (post_name, at_post) = events[-2:]
        assert (pre_name, post_name) == ("pre", "post")
        assert torch.equal(at_pre, before)
        assert torch.equal(at_post, params[0].detach())
        assert not torch.equal(at_pre, at_post)
    assert [name for name, _ in events] == ["pre", "post"] * 3

    for handle in handles:
        handle.remove()
    _one_step(opt, params, seed=3)
    assert len(events) == 6


def _adaptive_adamw(params: list[Tensor]) -> alr.ALROptimizer:
    return alr.ALROptimizer(
        params,
        lr=0.01,
        algorithm="adamw",
        hypergrad="mult",
        hypergrad_lr=0.1,
        hypergrad_scope="tensor",
        max_grad_norm=0.5,
        skip_nonfinite=True,
        backend="reference",
    )


def _clipped_nesterov_sgd(params: list[Tensor]) -> alr.ALROptimizer:
    return alr.SGD(params, lr=0.05, momentum=0.9, nesterov=True, max_grad_norm=0.5, skip_nonfinite=True)


@pytest.mark.parametrize(
    "copier",
    [
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(lambda opt: pickle.loads(pickle.dumps(opt)), id="pickle"),
    ],
)
@pytest.mark.parametrize(
    "make_opt",
    [pytest.param(_adaptive_adamw, id="ALROptimizer"), pytest.param(_clipped_nesterov_sgd, id="alr.SGD")],
)
def test_copy_continues_bit_identically(make_opt, copier) -> None:
    params = make_params(SHAPES)
    opt = make_opt(params)
    for step in range(3):
        _one_step(opt, params, step)

    duplicate = copier(opt)
    duplicate_params = duplicate.param_groups[0]["params"]
    assert type(duplicate) is type(opt)
    assert all(a is not b for a, b in zip(duplicate_params, params))
    assert duplicate.algorithm == opt.algorithm
    assert duplicate.max_grad_norm == 0.5
    assert duplicate.skip_nonfinite is True

    for step in range(3, 8):
        set_grads([params, duplicate_params], step, scale=3.0)
        opt.step()
        duplicate.step()
    for index, (got, want) in enumerate(zip(snapshot(duplicate, duplicate_params), snapshot(opt, params))):
        assert_bit_identical(got, want, f"tensor {index}")
    for got, want in zip(duplicate.stats().kappa, opt.stats().kappa):
        assert_bit_identical(got, want, "kappa")
    assert_bit_identical(duplicate.stats().grad_norm, opt.stats().grad_norm, "grad_norm")
    assert float(opt.stats().grad_norm) > 0.5  # so clipping was active


def test_adamw_copy_keeps_decoupled_weight_decay() -> None:
    opt = alr.AdamW(make_params(SHAPES), weight_decay=0.1)
    for duplicate in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert duplicate.param_groups[0]["decoupled_weight_decay"] is True


def test_repr() -> None:
    params = make_params(SHAPES)
    opt = alr.ALROptimizer(params, lr=0.01, backend="reference")
    _one_step(opt, params)
    text = repr(opt)
    assert text.startswith("ALROptimizer (")
    assert "Parameter Group 0" in text
    assert "lr: 0.01" in text
    assert "hypergrad: mult" in text
    assert repr(alr.SGD(make_params(SHAPES), lr=0.1)).startswith("SGD (")


def _two_group_adaptive(params: list[Tensor], scope: str, algorithm: str = "adamw") -> alr.ALROptimizer:
    return alr.ALROptimizer(
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}],
        lr=0.01,
        algorithm=algorithm,
        hypergrad="mult",
        hypergrad_lr=0.1,
        hypergrad_scope=scope,
        backend="reference",
    )


@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_stats_report_kappa_effective_lr_grad_norm_and_skips(scope) -> None:
    params = make_params(SHAPES)
    opt = _two_group_adaptive(params, scope)

    fresh = opt.stats()
    assert torch.isnan(fresh.grad_norm)
    assert int(fresh.skipped_steps) == 0
    assert all(torch.equal(k, torch.ones(len(g["params"]))) for k, g in zip(fresh.kappa, opt.param_groups))

    for step in range(6):
        _one_step(opt, params, step)
    stats = opt.stats()
    assert len(stats.kappa) == len(stats.effective_lr) == 2
    for group, kappa, effective_lr in zip(opt.param_groups, stats.kappa, stats.effective_lr):
        assert isinstance(kappa, Tensor) and kappa.dtype == torch.float32
        assert kappa.shape == (len(group["params"]),)
        assert torch.equal(effective_lr, kappa * group["lr"])
        if scope == "group":
            assert torch.equal(kappa, kappa[:1].expand_as(kappa))
    assert any(bool((kappa != 1).any()) for kappa in stats.kappa), "kappa never adapted"

    expected_norm = torch.sqrt(sum(p.grad.square().sum() for p in params))
    assert_tensors_close(stats.grad_norm, expected_norm, "grad_norm")
    assert stats.skipped_steps.dtype == torch.int64 and int(stats.skipped_steps) == 0

    set_grads([params], 6)
    params[0].grad[0, 0] = float("nan")
    before = snapshot(opt, params)
    opt.step()
    assert int(opt.stats().skipped_steps) == 1
    for index, (now, then) in enumerate(zip(snapshot(opt, params), before)):
        assert_bit_identical(now, then, f"tensor {index}")


@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_effective_lr_is_the_rate_the_next_step_applies(scope) -> None:
    """For plain SGD the update is exactly ``-effective_lr * grad``."""
    params = make_params(SHAPES[:-1])
    opt = _two_group_adaptive(params, scope, algorithm="sgd")
    for step in range(4):
        _one_step(opt, params, step)
    effective = torch.cat(opt.stats().effective_lr)
    assert not torch.equal(effective, torch.tensor([0.01, 0.01, 0.05, 0.05])), "kappa never adapted"

    set_grads([params], 4)
    before = [p.detach().clone() for p in params]
    opt.step()
    for index, (p, old, lr) in enumerate(zip(params, before, effective)):
        assert_tensors_close(p.detach(), old - lr * p.grad, f"params[{index}]")


@pytest.mark.parametrize("scope", ["group", "tensor"])
@pytest.mark.parametrize("hypergrad", ["off", "mult", "add"])
def test_one_element_tensor_lr_of_any_shape_follows_the_float_lr(hypergrad, scope) -> None:
    """torch accepts any 1-element Tensor lr; shapes [] and [1] train exactly like the float."""
    lr = torch.tensor(0.01).item()  # a float32 value, so that every run uses the same number
    runs = {}
    for name, group_lr in [("float", lr), ("0-d", torch.tensor(lr)), ("1-element", torch.tensor([lr]))]:
        params = make_params(SHAPES)
        opt = alr.ALROptimizer(
            params,
            lr=group_lr,
            algorithm="sgd",
            momentum=0.9,
            hypergrad=hypergrad,
            hypergrad_scope=scope,
            backend="reference",
        )
        for step in range(4):
            _one_step(opt, params, step)
        momentum_buffers = [opt.state[p]["momentum_buffer"] for p in params]
        runs[name] = [p.detach() for p in params] + momentum_buffers + opt.stats().kappa

    for name in ("0-d", "1-element"):
        for index, (got, want) in enumerate(zip(runs[name], runs["float"])):
            assert_bit_identical(got, want, f"{name} lr: tensor {index}")
    if hypergrad != "off":
        assert bool((runs["float"][-1] != 1).any()), "kappa never adapted"
