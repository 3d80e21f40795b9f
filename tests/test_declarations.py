"""The algorithm declarations (alr/algorithms.py) and what follows from them agree: the
Triton kernels' rows and scalar columns, the state each option creates, the ops' schemas."""

from __future__ import annotations

import pytest
import torch

import alr
from alr.algorithms import ADAM, ALGORITHMS, SGD, GroupHyper
from alr.op_args import op_schema


def test_triton_kernel_rows_and_columns_follow_the_declarations() -> None:
    pytest.importorskip("triton")
    from alr.kernels import step

    for algorithm, rows, columns in ((ADAM, step.ADAM_STREAMS, step.ADAM_SCALARS), (SGD, step.SGD_STREAMS, step.SGD_SCALARS)):
        assert rows == ("param", *(s.name for s in algorithm.streams), "master_param")
        assert columns == algorithm.scalar_columns


@pytest.mark.parametrize(
    ("options", "keys"),
    [
        (dict(algorithm="adamw"), {"step", "exp_avg", "exp_avg_sq"}),
        (dict(algorithm="adam", amsgrad=True), {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
        (dict(algorithm="sgd", hypergrad="off"), {"step"}),
        (dict(algorithm="sgd"), {"step", "hypergrad_prev_direction"}),
        (dict(algorithm="sgd", momentum=0.9), {"step", "momentum_buffer"}),
        (dict(algorithm="sgd", momentum=0.9, nesterov=True), {"step", "momentum_buffer", "hypergrad_prev_direction"}),
        (dict(algorithm="adamw", master_weights=True, dtype=torch.bfloat16), {"step", "exp_avg", "exp_avg_sq", "master_param"}),
        (dict(algorithm="sgd", momentum=0.9, stochastic_rounding=True, dtype=torch.bfloat16), {"step", "momentum_buffer", "rounding_key"}),
    ],
)
def test_state_is_what_the_declaration_says(options: dict, keys: set[str]) -> None:
    dtype = options.pop("dtype", torch.float32)
    p = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    opt = alr.ALROptimizer([p], lr=1e-2, backend="reference", **options)
    p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[p]) == keys
    hyper = GroupHyper.from_group(opt.param_groups[0], opt.algorithm)
    assert {s.name for s in hyper.streams(dtype)} == keys - {"step"}
    for stream in hyper.streams(dtype):
        assert opt.state[p][stream.name].dtype == stream.dtype_for(p, hyper)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_op_schemas_stay_within_sixteen_arguments(name: str) -> None:
    algorithm = ALGORITHMS[name]
    for update in (False, True):
        schema = torch._C.parse_schema(f"alr::x{op_schema(algorithm, update, 'alphas' if update else None)}")
        assert len(schema.arguments) <= 16, schema


def test_kernel_arguments_follow_the_declared_order() -> None:
    hyper = GroupHyper("adam", 1e-3, 0.1, True, decoupled_weight_decay=True, betas=(0.8, 0.99), eps=1e-6)
    assert ADAM.kernel_arguments(hyper) == {"hyper": [0.8, 0.99, 1e-6, 0.1], "decoupled_weight_decay": True, "maximize": True}
    hyper = GroupHyper("sgd", 1e-3, 0.0, False, momentum=0.9, dampening=0.1, nesterov=False)
    assert SGD.kernel_arguments(hyper) == {"hyper": [0.9, 0.1, 0.0], "nesterov": False, "maximize": False}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_native_schemas_are_the_declared_ones(name: str) -> None:
    """csrc/registration.cpp writes the typed ops' schemas out; they are the declaration's."""
    if alr._extension.load_cpu_extension() is None:
        pytest.skip(f"alr._C is not built here: {alr._extension.cpu_extension_error()}")
    algorithm = ALGORITHMS[name]
    for update, per_tensor, op in ((False, None, "hypergrad_stats"), (True, "alphas", "update_")):
        native = getattr(torch.ops.alr, f"{name}_{op}").default._schema
        declared = torch._C.parse_schema(f"alr::{name}_{op}{op_schema(algorithm, update, per_tensor)}")
        assert str(native) == str(declared)


def test_group_hyper_reads_the_declared_hyper_parameters_with_their_defaults() -> None:
    hyper = GroupHyper("sgd", 0.1, 0.0, False, momentum=0.9)
    assert (hyper.momentum, hyper.dampening, hyper.nesterov) == (0.9, 0.0, False)
    assert GroupHyper("adam", 0.1, 0.0, False).betas == ADAM.hyper_parameters["betas"]
    with pytest.raises(TypeError, match="sgd has no hyper-parameter betas"):
        GroupHyper("sgd", 0.1, 0.0, False, betas=(0.9, 0.999))
    with pytest.raises(AttributeError, match="adam has no hyper-parameter 'momentum'"):
        GroupHyper("adam", 0.1, 0.0, False).momentum
