"""alr.Adam, alr.AdamW and alr.SGD follow torch.optim's trajectories, step by step.

Every test trains an alr drop-in and its torch namesake in lockstep on identical
gradients and compares the parameters and every state tensor after every step with
``helpers.assert_optimizer_state_close``. The torch reference is its for-loop
implementation (``foreach=False``) for float32 and float64; for 16-bit parameters it is
``fused=True``, whose CPU kernels compute in float32 as alr does.

torch's fused CPU SGD with momentum is a valid 16-bit reference only in its scalar tail:
on tensors of 16 or more elements (measured with torch 2.13 on x86) its vectorized loop,
which reads the 16-bit momentum buffer with a float32 vector load, drifts from torch's own
for-loop by whole units after a few steps. The 16-bit SGD comparisons therefore rely on
``helpers.SHAPES`` being small, and assert it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

import alr
from helpers import SHAPES, assert_optimizer_state_close, clone_params, make_params, set_grads

STEPS = 20
ADAM_LR = 1e-2
SGD_LR = 5e-2

ADAM_FAMILY = [
    pytest.param(alr.Adam, torch.optim.Adam, id="Adam"),
    pytest.param(alr.AdamW, torch.optim.AdamW, id="AdamW"),
]

# dtype -> the torch implementation it is compared against
REFERENCE_IMPL = {
    torch.float32: {"foreach": False},
    torch.float64: {"foreach": False},
    torch.bfloat16: {"fused": True},
    torch.float16: {"fused": True},
}
FUSED_SGD_SCALAR_TAIL = 16
"""Tensors shorter than this stay in the scalar loop of torch's fused CPU SGD (see above)."""

DTYPES = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in REFERENCE_IMPL]


def _option_id(options: dict) -> str:
    """A readable test id, e.g. ``wd=0.1,amsgrad,maximize,tensor_lr``."""
    parts = []
    for key, value in options.items():
        if isinstance(value, bool):
            if value:
                parts.append(key)
        else:
            parts.append(f"{key}={value}")
    return ",".join(parts) or "defaults"


def _adam_options() -> list:
    grid = itertools.product([0.0, 0.1], [False, True], [False, True], [False, True])
    return [
        pytest.param(options, id=_option_id(options))
        for options in (
            {"weight_decay": wd, "amsgrad": amsgrad, "maximize": maximize, "tensor_lr": tensor_lr}
            for wd, amsgrad, maximize, tensor_lr in grid
        )
    ]


def _sgd_options() -> list:
    cases = []
    grid = itertools.product([0.0, 0.9], [0.0, 0.5], [False, True], [0.0, 0.1], [False, True], [False, True])
    for momentum, dampening, nesterov, wd, maximize, tensor_lr in grid:
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # torch rejects these
        if momentum == 0 and dampening != 0:
            continue  # dampening only acts on the momentum buffer
        options = {
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "weight_decay": wd,
            "maximize": maximize,
            "tensor_lr": tensor_lr,
        }
        cases.append(pytest.param(options, id=_option_id(options)))
    return cases


def _constructor_kwargs(options: dict, base_lr: float) -> dict:
    """Turns the ``tensor_lr`` flag into an ``lr`` argument (a fresh tensor per call)."""
    kwargs = dict(options)
    tensor_lr = kwargs.pop("tensor_lr", False)
    kwargs["lr"] = torch.tensor(base_lr) if tensor_lr else base_lr
    return kwargs


def _set_grads_like_autograd(param_sets: Sequence[Sequence[Tensor]], seed: int) -> None:
    """``helpers.set_grads``, with each gradient laid out like its parameter, as autograd does."""
    set_grads(param_sets, seed)
    for params in param_sets:
        for p in params:
            p.grad = torch.empty_like(p).copy_(p.grad)


def _train_in_lockstep(
    alr_opt: torch.optim.Optimizer,
    alr_params: Sequence[Tensor],
    torch_opt: torch.optim.Optimizer,
    torch_params: Sequence[Tensor],
    steps: int = STEPS,
) -> None:
    """Same gradients each step; parameters and all state compared after every step."""
    for step in range(steps):
        _set_grads_like_autograd([alr_params, torch_params], seed=step)
        alr_opt.step()
        torch_opt.step()
        assert_optimizer_state_close(alr_opt, alr_params, torch_opt, torch_params)


def _assert_trained(initial: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    """Every non-empty parameter moved away from its initial value."""
    for index, (before, after) in enumerate(zip(initial, params)):
        if before.numel():
            assert not torch.equal(before, after.detach()), f"params[{index}] never changed"


def _check_parity(
    make_alr: Callable[[list[Tensor]], torch.optim.Optimizer],
    make_torch: Callable[[list[Tensor]], torch.optim.Optimizer],
    params: list[Tensor],
) -> None:
    """Trains both optimizers over copies of ``params`` and compares them every step."""
    torch_params = clone_params(params)
    initial = [p.detach().clone() for p in params]
    _train_in_lockstep(make_alr(params), params, make_torch(torch_params), torch_params)
    _assert_trained(initial, params)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", _adam_options())
@pytest.mark.parametrize(("alr_cls", "torch_cls"), ADAM_FAMILY)
def test_adam_family_matches_torch(alr_cls, torch_cls, options, dtype) -> None:
    impl = REFERENCE_IMPL[dtype]
    _check_parity(
        lambda params: alr_cls(params, **_constructor_kwargs(options, ADAM_LR)),
        lambda params: torch_cls(params, **_constructor_kwargs(options, ADAM_LR), **impl),
        make_params(SHAPES, dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", _sgd_options())
def test_sgd_matches_torch(options, dtype) -> None:
    impl = REFERENCE_IMPL[dtype]
    params = make_params(SHAPES, dtype)
    if impl.get("fused") and options["momentum"]:
        assert max(p.numel() for p in params) < FUSED_SGD_SCALAR_TAIL
    _check_parity(
        lambda ps: alr.SGD(ps, **_constructor_kwargs(options, SGD_LR)),
        lambda ps: torch.optim.SGD(ps, **_constructor_kwargs(options, SGD_LR), **impl),
        params,
    )


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize(
    "torch_factory",
    [
        pytest.param(lambda params, **kw: torch.optim.AdamW(params, **kw), id="torch.AdamW"),
        pytest.param(
            lambda params, **kw: torch.optim.Adam(params, decoupled_weight_decay=True, **kw),
            id="torch.Adam(decoupled_weight_decay=True)",
        ),
    ],
)
def test_adam_decoupled_weight_decay_is_adamw(torch_factory, amsgrad) -> None:
    options = {"lr": ADAM_LR, "weight_decay": 0.1, "amsgrad": amsgrad}
    _check_parity(
        lambda params: alr.Adam(params, **options, decoupled_weight_decay=True),
        lambda params: torch_factory(params, **options, foreach=False),
        make_params(SHAPES),
    )


# (alr class, torch class, constructor options) exercising most branches at once
_RICH_CONFIGS = [
    pytest.param(
        alr.Adam, torch.optim.Adam, {"lr": ADAM_LR, "weight_decay": 0.1, "amsgrad": True, "maximize": True}, id="Adam"
    ),
    pytest.param(alr.AdamW, torch.optim.AdamW, {"lr": ADAM_LR, "weight_decay": 0.1, "amsgrad": True}, id="AdamW"),
    pytest.param(
        alr.SGD, torch.optim.SGD, {"lr": SGD_LR, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        id="SGD-nesterov",
    ),
    pytest.param(
        alr.SGD, torch.optim.SGD, {"lr": SGD_LR, "momentum": 0.9, "dampening": 0.5, "maximize": True},
        id="SGD-dampening",
    ),
]


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}], ids=["foreach", "fused"])
@pytest.mark.parametrize(("alr_cls", "torch_cls", "options"), _RICH_CONFIGS)
def test_matches_torch_multi_tensor_implementations(alr_cls, torch_cls, options, impl) -> None:
    """The for-loop is the main reference; the foreach and fused paths agree as well."""
    _check_parity(
        lambda params: alr_cls(params, **options),
        lambda params: torch_cls(params, **options, **impl),
        make_params(SHAPES),
    )


@pytest.mark.parametrize(("alr_cls", "torch_cls"), ADAM_FAMILY)
def test_tensor_betas_match_torch(alr_cls, torch_cls) -> None:
    def options() -> dict:
        return {"lr": ADAM_LR, "betas": (torch.tensor(0.8), torch.tensor(0.99)), "weight_decay": 0.1}

    _check_parity(
        lambda params: alr_cls(params, **options()),
        lambda params: torch_cls(params, **options(), foreach=False),
        make_params(SHAPES),
    )


def _two_groups(params: list[Tensor], second: dict) -> list[dict]:
    return [{"params": params[:2]}, {"params": params[2:], **second}]


@pytest.mark.parametrize(
    ("alr_cls", "torch_cls", "defaults", "second_group"),
    [
        pytest.param(
            alr.Adam, torch.optim.Adam,
            {"lr": ADAM_LR, "betas": (0.9, 0.999)},
            {"lr": 0.05, "weight_decay": 0.2, "betas": (0.8, 0.99), "amsgrad": True},
            id="Adam",
        ),
        pytest.param(
            alr.AdamW, torch.optim.AdamW,
            {"lr": ADAM_LR, "weight_decay": 0.01},
            {"lr": 0.03, "weight_decay": 0.3, "betas": (0.7, 0.95), "eps": 1e-6},
            id="AdamW",
        ),
        pytest.param(
            alr.SGD, torch.optim.SGD,
            {"lr": SGD_LR, "momentum": 0.9},
            {"lr": 0.01, "weight_decay": 0.2, "momentum": 0.5, "nesterov": True},
            id="SGD",
        ),
    ],
)
def test_param_groups_with_different_options(alr_cls, torch_cls, defaults, second_group) -> None:
    _check_parity(
        lambda params: alr_cls(_two_groups(params, second_group), **defaults),
        lambda params: torch_cls(_two_groups(params, second_group), **defaults, foreach=False),
        make_params(SHAPES),
    )


def _strided_params() -> list[Tensor]:
    """A channels-last 4-d parameter and a transposed (non-contiguous) leaf."""
    generator = torch.Generator().manual_seed(1)
    channels_last = torch.randn(2, 3, 4, 5, generator=generator).to(memory_format=torch.channels_last)
    transposed = torch.randn(4, 6, generator=generator).t()
    return [channels_last.requires_grad_(), transposed.detach().requires_grad_()]


@pytest.mark.parametrize(("alr_cls", "torch_cls", "options"), _RICH_CONFIGS)
def test_channels_last_and_non_contiguous_params(alr_cls, torch_cls, options) -> None:
    """Values match torch, and the parameters and state keep torch's memory layout.

    torch's SGD momentum buffer starts as a clone of the gradient, so it takes the
    gradient's layout; the gradients here are laid out like their parameters, as
    autograd's would be.
    """
    params = _strided_params()
    assert params[0].is_contiguous(memory_format=torch.channels_last) and not params[0].is_contiguous()
    assert not params[1].is_contiguous()
    torch_params = clone_params(params)
    strides = [p.stride() for p in params]
    alr_opt = alr_cls(params, **options)
    torch_opt = torch_cls(torch_params, **options, foreach=False)
    initial = [p.detach().clone() for p in params]

    _train_in_lockstep(alr_opt, params, torch_opt, torch_params)

    _assert_trained(initial, params)
    assert [p.stride() for p in params] == strides
    for p, q in zip(params, torch_params):
        for key, value in torch_opt.state[q].items():
            if key != "step":
                assert alr_opt.state[p][key].stride() == value.stride(), key


@pytest.mark.parametrize(("alr_cls", "torch_cls", "options"), _RICH_CONFIGS)
def test_param_without_grad_is_untouched(alr_cls, torch_cls, options) -> None:
    """A parameter whose grad is None on a step keeps its value, state and step count."""
    params = make_params(SHAPES)
    torch_params = clone_params(params)
    alr_opt = alr_cls(params, **options)
    torch_opt = torch_cls(torch_params, **options, foreach=False)
    sometimes = 1  # the (7,) vector: no gradient on steps 0-2 and every third step after
    steps_without_grad = 0
    for step in range(STEPS):
        set_grads([params, torch_params], seed=step)
        without_grad = step < 3 or step % 3 == 0
        if without_grad:
            params[sometimes].grad = None
            torch_params[sometimes].grad = None
            steps_without_grad += 1
        before = params[sometimes].detach().clone()
        state_before = {k: v.clone() for k, v in alr_opt.state.get(params[sometimes], {}).items()}
        alr_opt.step()
        torch_opt.step()
        assert_optimizer_state_close(alr_opt, params, torch_opt, torch_params)
        if without_grad:
            assert torch.equal(params[sometimes].detach(), before)
            state_after = alr_opt.state.get(params[sometimes], {})
            assert state_after.keys() == state_before.keys()
            for key, value in state_before.items():
                assert torch.equal(state_after[key], value), key
        else:
            assert not torch.equal(params[sometimes].detach(), before)
    assert float(alr_opt.state[params[sometimes]]["step"]) == STEPS - steps_without_grad


@pytest.mark.parametrize(("alr_cls", "torch_cls", "options"), _RICH_CONFIGS)
def test_group_with_two_dtypes(alr_cls, torch_cls, options) -> None:
    """One group holding float32 and float64 tensors; each compared at its own tolerance."""
    float32 = make_params([(3, 4), (), (0,)], torch.float32, seed=2)
    float64 = make_params([(7,), (5, 1, 2)], torch.float64, seed=3)
    params = [float32[0], float64[0], float32[1], float64[1], float32[2]]  # interleaved
    _check_parity(
        lambda ps: alr_cls(ps, **options),
        lambda ps: torch_cls(ps, **options, foreach=False),
        params,
    )
