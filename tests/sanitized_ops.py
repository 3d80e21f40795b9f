"""Drives the op input layer of a sanitizer build of ``_C`` (csrc/op_inputs.h, csrc/cpu/ops.cpp)
with bad and edge-case inputs; run by tests/test_build.py under AddressSanitizer.

    python tests/sanitized_ops.py BUILD_DIR

Every bad call must raise a RuntimeError from the input layer (before a kernel runs) and
every edge case must run; any out-of-bounds access aborts the process through ASan/UBSan.
Prints one JSON line: the number of bad and good calls made.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ADAM = dict(hyper=[0.9, 0.999, 1e-8, 0.01], decoupled_weight_decay=True, maximize=False)
SGD = dict(hyper=[0.9, 0.0, 0.0], nesterov=False, maximize=False)


def load_extension(build_dir: Path) -> None:
    """Import the ``_C`` built in ``build_dir``: it registers the alr ops."""
    path = next(build_dir.glob("_C.*.so"))
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def adam_inputs(shapes, dtype=torch.float32) -> dict[str, list]:
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    return dict(
        params=params,
        grads=[torch.randn_like(p) for p in params],
        steps=[torch.tensor(1.0) for _ in params],
        exp_avg=[torch.zeros_like(p) for p in params],
        exp_avg_sq=[torch.zeros_like(p) for p in params],
        max_exp_avg_sq=[],
        master_param=[],
        rounding_key=[],
    )


def adam_update(lists: dict, alphas=None, hyper=None, collect_stats=True):
    n = len(lists["params"])
    alphas = torch.full((n,), 1e-3, dtype=torch.float64) if alphas is None else alphas
    kwargs = dict(ADAM, hyper=hyper or ADAM["hyper"])
    return torch.ops.alr.adam_update_(*lists.values(), alphas, None, None, None, **kwargs, collect_stats=collect_stats)


def sgd_update(lists: dict, momentum: float = 0.9):
    n = len(lists["params"])
    args = [lists[k] for k in ("params", "grads", "steps")]
    args += [lists.get("momentum_buffer", []), lists.get("prev", []), [], []]
    alphas = torch.full((n,), 1e-3, dtype=torch.float64)
    return torch.ops.alr.sgd_update_(*args, alphas, None, None, None, **dict(SGD, hyper=[momentum, 0.0, 0.0]), collect_stats=True)


def edited(base: dict, **changes) -> dict:
    return {**base, **changes}


def bad_calls() -> list[tuple[str, Callable[[], object]]]:
    base = adam_inputs([(33,), (4, 5), ()])
    short = [torch.zeros(1), *base["exp_avg"][1:]]
    half_state = [t.half() for t in base["exp_avg"]]
    sgd_base = {k: base[k] for k in ("params", "grads", "steps")}
    return [
        ("grads shorter than params", lambda: adam_update(edited(base, grads=base["grads"][:2]))),
        ("exp_avg list shorter", lambda: adam_update(edited(base, exp_avg=base["exp_avg"][:1]))),
        ("exp_avg of 1 element", lambda: adam_update(edited(base, exp_avg=short))),
        ("exp_avg of another dtype", lambda: adam_update(edited(base, exp_avg=half_state))),
        ("grad of another dtype", lambda: adam_update(edited(base, grads=[g.double() for g in base["grads"]]))),
        ("steps list shorter", lambda: adam_update(edited(base, steps=base["steps"][:1]))),
        ("hyper of 3 values", lambda: adam_update(base, hyper=[0.9, 0.999, 1e-8])),
        ("alphas of 1 element", lambda: adam_update(base, alphas=torch.ones(1, dtype=torch.float64))),
        ("master copies for float32", lambda: adam_update(edited(base, master_param=[p.clone() for p in base["params"]]))),
        ("rounding keys for float32", lambda: adam_update(edited(base, rounding_key=[torch.tensor(1) for _ in base["params"]]))),
        ("mixed parameter dtypes", lambda: adam_update(edited(base, params=[base["params"][0].double(), *base["params"][1:]]))),
        ("amsgrad list shorter", lambda: adam_update(edited(base, max_exp_avg_sq=base["exp_avg"][:1]))),
        ("sgd momentum without buffers", lambda: sgd_update(sgd_base)),
        ("sgd buffer of wrong shape", lambda: sgd_update(edited(sgd_base, momentum_buffer=[torch.zeros(2)] * 3))),
        ("grad_stats mixed dtypes", lambda: torch.ops.alr.grad_stats(base["grads"][:1] + [base["grads"][1].double()], None)),
        ("grad_scale of 2 elements", lambda: torch.ops.alr.grad_stats(base["grads"], torch.ones(2))),
    ]


def good_calls() -> list[tuple[str, Callable[[], object]]]:
    def layouts():
        """Parameters in other layouts than their (contiguous) gradients and state: staged."""
        lists = adam_inputs([(6, 7), (3, 4, 5, 2)])
        lists["params"] = [torch.randn(7, 6).t(), lists["params"][1].to(memory_format=torch.channels_last)]
        return adam_update(lists)

    return [
        ("0-size and 0-d tensors", lambda: adam_update(adam_inputs([(0,), (), (0, 3)]))),
        ("transposed and channels-last parameters", layouts),
        ("bfloat16 with float32 masters", lambda: adam_update(
            edited(
                (lists := adam_inputs([(70000,), (5,)], torch.bfloat16)),
                exp_avg=[t.float() for t in lists["exp_avg"]],
                exp_avg_sq=[t.float() for t in lists["exp_avg_sq"]],
                master_param=[p.float() for p in lists["params"]],
            )
        )),
        ("grad_stats over many tensors", lambda: torch.ops.alr.grad_stats([torch.randn(n) for n in range(50)], torch.tensor(2.0))),
    ]


def main() -> None:
    load_extension(Path(sys.argv[1]))
    for name, call in bad_calls():
        try:
            call()
        except RuntimeError:
            continue
        raise SystemExit(f"bad input accepted: {name}")
    for name, call in good_calls():
        call()
    print(json.dumps({"bad": len(bad_calls()), "good": len(good_calls())}))


if __name__ == "__main__":
    main()
