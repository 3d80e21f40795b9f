"""Low-precision options: ``master_weights``, ``stochastic_rounding`` and ``state_dtype``.

The reference defines them (see its docstring); every native backend must match it, and
round stochastically bit for bit as it does.
"""

from __future__ import annotations

import copy

import pytest
import torch

import alr
from alr import reference
from helpers import assert_bit_identical, assert_optimizer_state_close, snapshot
from parity import assert_kappa_close, make_pair, run_parity, set_same_grads, skip_unsupported_dtype, typed_params

pytestmark = pytest.mark.usefixtures("one_thread")

HD = dict(hypergrad="mult", hypergrad_lr=0.05)
CASES = {
    "adamw-bf16-master": (torch.bfloat16, dict(algorithm="adamw", master_weights=True, **HD)),
    "adam-fp16-master-fp32-state-amsgrad-clip": (
        torch.float16,
        dict(algorithm="adam", master_weights=True, state_dtype=torch.float32, amsgrad=True, weight_decay=0.1, max_grad_norm=1.0, **HD),
    ),
    "adamw-bf16-master-bf16-state": (torch.bfloat16, dict(algorithm="adamw", master_weights=True, state_dtype=torch.bfloat16, **HD)),
    "adamw-bf16-stochastic": (torch.bfloat16, dict(algorithm="adamw", stochastic_rounding=True, **HD)),
    "sgd-nesterov-bf16-stochastic": (torch.bfloat16, dict(algorithm="sgd", momentum=0.9, nesterov=True, stochastic_rounding=True, **HD)),
    "adamw-fp32-bf16-state": (torch.float32, dict(algorithm="adamw", state_dtype=torch.bfloat16, **HD)),
    "sgd-fp32-bf16-state-exact": (torch.float32, dict(algorithm="sgd", momentum=0.9, state_dtype=torch.bfloat16, hypergrad_exact=True, **HD)),
    "sgd-bf16-master-coupled-wd": (torch.bfloat16, dict(algorithm="sgd", momentum=0.9, weight_decay=0.1, master_weights=True, **HD)),
}
SHAPES = [(5, 3), (0,), (), (1500,), (40,)]


# --- backends ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_backends_match_the_reference(backend: str, device: torch.device, case) -> None:
    dtype, options = case
    run_parity(backend, lambda: typed_params(SHAPES, dtype, device=device), options)


def _storage_combinations():
    """Every (parameter dtype, state dtype, parameter write) the options can produce."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for state in dict.fromkeys((dtype, torch.float32, torch.bfloat16)):
            for write in ("nearest", "master", "stochastic"):
                sixteen_bit = dtype in (torch.bfloat16, torch.float16)
                if write == "master" and not (sixteen_bit and state != torch.float16):
                    continue  # no master for 32/64-bit parameters; state_dtype cannot be float16
                if write == "stochastic" and dtype != torch.bfloat16:
                    continue
                yield dtype, state, write


COMBINATIONS = {f"{str(d)[6:]}-{str(s)[6:]}-state-{w}": (d, s, w) for d, s, w in _storage_combinations()}


@pytest.mark.parametrize("algorithm", ["adamw-amsgrad", "sgd-nesterov"])
@pytest.mark.parametrize("combination", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_every_storage_combination_matches_the_reference(backend: str, device: torch.device, combination, algorithm: str) -> None:
    """Each combination of parameter dtype, state dtype and write (nearest, master, stochastic),
    with a transposed parameter whose gradient is row-major (the backends stage it into the
    parameter's layout, where the stochastic-rounding index is the element's memory offset)."""
    dtype, state, write = combination
    skip_unsupported_dtype(backend, dtype)
    options = dict(
        algorithm="adamw", amsgrad=True, weight_decay=0.1, **HD
    ) if algorithm == "adamw-amsgrad" else dict(algorithm="sgd", momentum=0.9, nesterov=True, weight_decay=0.1, **HD)
    options.update(
        state_dtype=state if state in (torch.float32, torch.bfloat16) else None,
        master_weights=write == "master",
        stochastic_rounding=write == "stochastic",
    )

    def make():
        transposed = typed_params([(33, 20)], dtype, seed=1, device=device)[0].detach().t().requires_grad_()
        return typed_params([(5, 3), (0,), (), (1500,)], dtype, device=device) + [transposed]

    ps, opt = run_parity(backend, make, options, steps=3, like_param=False)
    assert opt.state[ps[0]]["exp_avg" if options["algorithm"] == "adamw" else "momentum_buffer"].dtype == state


# --- the options' semantics (reference) ----------------------------------------------------------


def test_master_weights_keep_small_updates_that_bfloat16_loses() -> None:
    """An update below half a bfloat16 ulp vanishes when rounded to nearest each step, but
    accumulates in the master; the parameter is always the master's rounded image."""
    plain = [torch.ones(256, dtype=torch.bfloat16, requires_grad=True)]
    mastered = [torch.ones(256, dtype=torch.bfloat16, requires_grad=True)]
    options = dict(algorithm="sgd", lr=1e-3, hypergrad="off", backend="reference")
    opts = [alr.ALROptimizer(plain, **options), alr.ALROptimizer(mastered, master_weights=True, **options)]
    for _ in range(20):
        for params, opt in zip((plain, mastered), opts):
            params[0].grad = torch.ones_like(params[0])
            opt.step()
            master = opt.state[params[0]].get("master_param")
            if master is not None:
                assert master.dtype == torch.float32
                assert_bit_identical(params[0].detach(), master.to(torch.bfloat16), "param is not the master's image")
    assert torch.equal(plain[0].detach(), torch.ones_like(plain[0]))  # 1 - 1e-3 rounds back to 1
    assert torch.allclose(opts[1].state[mastered[0]]["master_param"], torch.full((256,), 1 - 20e-3), atol=1e-5)
    assert (mastered[0].detach() < 1).all()


def test_stochastic_rounding_is_unbiased_and_keeps_small_updates() -> None:
    x = torch.full((1 << 16,), 1 + 2**-9)  # a quarter of the way from 1 to the next bfloat16
    offsets = torch.arange(x.numel())
    rounded = reference.stochastic_round_to_bfloat16(x, torch.tensor(12345), offsets).float()
    assert set(rounded.unique().tolist()) == {1.0, 1 + 2**-7}
    # Binomial with p = 1/4: the mean is within 4 standard deviations of x.
    sigma = (0.25 * 0.75 / x.numel()) ** 0.5 * 2**-7
    assert abs(rounded.mean().item() - (1 + 2**-9)) < 4 * sigma
    exact = torch.tensor([1.0, -2.5, 0.0, float("inf"), float("-inf")])
    assert torch.equal(reference.stochastic_round_to_bfloat16(exact, torch.tensor(7), torch.arange(5)).float(), exact)
    assert reference.stochastic_round_to_bfloat16(torch.tensor([float("nan")]), torch.tensor(7), torch.arange(1)).isnan().all()

    p = [torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)]
    opt = alr.ALROptimizer(p, algorithm="sgd", lr=1e-3, hypergrad="off", stochastic_rounding=True, backend="reference")
    for _ in range(20):
        p[0].grad = torch.ones_like(p[0])
        opt.step()
    assert abs(p[0].float().mean().item() - (1 - 20e-3)) < 1e-3  # round to nearest would stay at 1


def test_stochastic_rounding_streams_are_reproducible_and_vary() -> None:
    def run(seed: int, steps: int) -> torch.Tensor:
        p = [torch.full((2048,), 1 + 2**-9, dtype=torch.float32).to(torch.bfloat16).requires_grad_()]
        p[0].data.fill_(1.0)
        opt = alr.ALROptimizer(p, algorithm="sgd", lr=1e-3, hypergrad="off", stochastic_rounding=True, rounding_seed=seed, backend="reference")
        for _ in range(steps):
            p[0].grad = torch.ones_like(p[0])
            opt.step()
        return p[0].detach().clone()

    assert torch.equal(run(0, 3), run(0, 3))
    assert not torch.equal(run(0, 3), run(1, 3))
    keys = reference.rounding_streams([torch.tensor(5), torch.tensor(5)], [torch.tensor(0.0), torch.tensor(1.0)])
    assert keys[0] != keys[1] and (keys >= 0).all() and (keys < 2**32).all()


@pytest.mark.parametrize(
    ("dtype", "options", "expected"),
    [
        (torch.bfloat16, {}, torch.bfloat16),  # torch.optim's choice
        (torch.bfloat16, {"master_weights": True}, torch.float32),
        (torch.bfloat16, {"stochastic_rounding": True}, torch.float32),
        (torch.float16, {"master_weights": True}, torch.float32),
        (torch.bfloat16, {"master_weights": True, "state_dtype": torch.bfloat16}, torch.bfloat16),
        (torch.float32, {"master_weights": True}, torch.float32),
    ],
)
def test_default_state_dtype(dtype: torch.dtype, options: dict, expected: torch.dtype) -> None:
    """Moments are float32 by default under master weights and stochastic rounding: in
    bfloat16, v cannot decay by β2 = 0.999 (its change is below half an ulp)."""
    params = typed_params([(8,)], dtype)
    opt = alr.ALROptimizer(params, algorithm="sgd", momentum=0.9, backend="reference", **options)
    set_same_grads([params], seed=0)
    opt.step()
    assert opt.state[params[0]]["momentum_buffer"].dtype == expected
    assert ("master_param" in opt.state[params[0]]) == (options.get("master_weights", False) and dtype != torch.float32)


def test_state_dtype_stores_moments_in_bfloat16() -> None:
    params = typed_params([(64, 64)], torch.float32)
    opt = alr.ALROptimizer(params, state_dtype=torch.bfloat16, backend="reference")
    set_same_grads([params], seed=0)
    opt.step()
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert params[0].dtype == torch.float32
    with pytest.raises(ValueError, match="Invalid state_dtype: torch.float16"):
        alr.ALROptimizer(params, state_dtype=torch.float16)


@pytest.mark.parametrize("case", ["adamw-bf16-master", "sgd-nesterov-bf16-stochastic", "adamw-fp32-bf16-state"])
def test_state_dict_round_trip_continues_bit_identically(case: str) -> None:
    """Master copies, rounding keys and bfloat16 moments survive a state dict exactly (torch's
    load would cast them to the parameter's dtype), so the resumed run equals the original."""
    dtype, options = CASES[case]
    ps, opt, qs, ref = make_pair("reference", lambda: typed_params(SHAPES, dtype), options)
    for step in range(3):
        set_same_grads([ps], seed=step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for q, p in zip(qs, ps):
        q.data.copy_(p.detach())
    ref.load_state_dict(saved)
    for key, value in opt.state[ps[0]].items():
        assert value.dtype == ref.state[qs[0]][key].dtype, key
    for step in range(3, 6):
        set_same_grads([ps, qs], seed=step)
        opt.step()
        ref.step()
    for a, b in zip(snapshot(opt, ps), snapshot(ref, qs)):
        assert_bit_identical(a, b, "resumed run differs")


@pytest.mark.parametrize("case", ["adamw-bf16-master", "sgd-nesterov-bf16-stochastic"])
def test_skipped_step_leaves_master_and_state_bit_identical(backend: str, device: torch.device, case: str) -> None:
    dtype, options = CASES[case]
    ps, opt, qs, ref = make_pair(backend, lambda: typed_params(SHAPES, dtype, device=device), {**options, "skip_nonfinite": True})
    for step in range(4):
        set_same_grads([ps, qs], seed=step, poison=(3, float("nan")) if step == 2 else None)
        before = snapshot(opt, ps)
        opt.step()
        ref.step()
        if step == 2:
            for a, b in zip(snapshot(opt, ps), before):
                assert_bit_identical(a, b, "a skipped step changed a tensor")
        assert_optimizer_state_close(opt, ps, ref, qs)
        assert_kappa_close(opt, ref)


def test_fp16_with_grad_scaler_and_master_weights_trains_on_the_reference() -> None:
    _train_fp16_with_grad_scaler("reference", torch.device("cpu"))


def test_fp16_with_grad_scaler_and_master_weights_trains(backend: str, device: torch.device) -> None:
    _train_fp16_with_grad_scaler(backend, device)


def _train_fp16_with_grad_scaler(backend: str, device: torch.device) -> None:
    """fp16 parameters, GradScaler (scale handed to the step), master weights: the loss
    falls, and an overflowing step is skipped while the scaler backs off."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device).half()
    opt = alr.ALROptimizer(model.parameters(), lr=1e-2, master_weights=True, backend=backend)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    x, y = torch.randn(64, 16).to(device).half(), torch.randn(64, 1).to(device).half()
    losses = []
    for step in range(30):
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        scaler.scale(loss * (1e30 if step == 5 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(loss.item())
    assert int(opt.stats().skipped_steps) == 1 and scaler.get_scale() < 2.0**10
    assert losses[-1] < 0.7 * losses[0]
    for p in model.parameters():
        assert_bit_identical(p.detach(), opt.state[p]["master_param"].half(), "fp16 param is not the master's image")


def test_stochastic_rounding_is_bit_identical_across_backends(backend: str, device: torch.device) -> None:
    """The random stream is part of the algorithm: a backend rounds exactly the elements
    the reference rounds up (the tolerance of the parity tests would hide a backend that
    rounded to nearest instead; here 95% of the elements differ between the two)."""
    options = CASES["adamw-bf16-stochastic"][1]
    make = lambda: typed_params([(1500,), (40,)], torch.bfloat16, device=device)  # noqa: E731
    ps, opt, qs, ref = make_pair(backend, make, options)
    nearest = make()
    nearest_opt = alr.ALROptimizer(nearest, backend="reference", lr=1e-2, **{**options, "stochastic_rounding": False})
    for step in range(5):
        set_same_grads([ps, qs, nearest], seed=step)
        for o in (opt, ref, nearest_opt):
            o.step()
    for p, q in zip(ps, qs):
        assert_bit_identical(p.detach().cpu(), q.detach().cpu(), "stochastic rounding differs from the reference")
    assert (ps[0].detach().cpu() != nearest[0].detach().cpu()).float().mean() > 0.5
