"""The per-group bucketing cache never serves stale tensors.

``ALROptimizer`` reuses a group's bucketing between steps; it must notice when gradients
appear or vanish, when the state is loaded, replaced or cleared, and when options change
the state layout.
"""

from __future__ import annotations

import copy

import torch

import alr
from helpers import assert_optimizer_state_close, clone_params, make_params, set_grads

SHAPES = [(3, 4), (5,), (2, 2)]


def _pair(**options):
    params = make_params(SHAPES)
    twin = clone_params(params)
    options = {"lr": 0.05, "backend": "reference", **options}
    return params, alr.ALROptimizer(params, **options), twin, alr.ALROptimizer(twin, **options)


def test_load_state_dict_into_the_same_optimizer_mid_run() -> None:
    params, opt, twin, twin_opt = _pair()
    set_grads([params, twin], seed=0)
    opt.step()
    twin_opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for seed in (1, 2):
        set_grads([params], seed=seed)
        opt.step()
    with torch.no_grad():
        for p, t in zip(params, twin):
            p.copy_(t)
    opt.load_state_dict(saved)
    for seed in (3, 4):
        set_grads([params, twin], seed=seed)
        opt.step()
        twin_opt.step()
    assert_optimizer_state_close(opt, params, twin_opt, twin)


def test_gradient_that_vanishes_and_returns() -> None:
    params, opt, twin, twin_opt = _pair(algorithm="sgd", momentum=0.9)
    for seed in range(4):
        set_grads([params, twin], seed=seed)
        if seed in (1, 2):
            params[1].grad = twin[1].grad = None
        opt.step()
        twin_opt.step()
    assert_optimizer_state_close(opt, params, twin_opt, twin)
    assert float(opt.state[params[1]]["step"]) == 2


def test_cleared_state_starts_fresh() -> None:
    params, opt, _, _ = _pair()
    set_grads([params], seed=0)
    opt.step()
    opt.state.clear()
    set_grads([params], seed=1)
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in params)


def test_option_change_that_adds_state_is_picked_up() -> None:
    params, opt, _, _ = _pair(algorithm="adam")
    set_grads([params], seed=0)
    opt.step()
    opt.param_groups[0]["amsgrad"] = True
    set_grads([params], seed=1)
    opt.step()
    assert all(opt.state[p]["max_exp_avg_sq"].abs().sum() > 0 for p in params)
