"""What is particular to the ``cpu`` backend (alr._C's ops through alr._native): its
registration, the ops called directly (statistics, skip, input checks, opcheck), one call
per bucket, and bit-determinism across runs, thread counts and instruction sets.

Its parity with the reference, option by option, is in test_backend_parity.py; the element
math and the chunking are tested natively as well (csrc/tests, via ctest).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import alr
from alr import _native, backends, reference
from alr.bucket import Bucket, GroupHyper
from alr.op_args import op_lists
from helpers import assert_bit_identical, assert_tensors_close, snapshot
from parity import DTYPES, set_same_grads, typed_params

pytestmark = [
    pytest.mark.skipif(
        backends.backend_unavailable_reason("cpu") is not None,
        reason=f"cpu backend unavailable: {backends.backend_unavailable_reason('cpu')}",
    ),
    pytest.mark.usefixtures("one_thread"),
]



# --- registration ------------------------------------------------------------------------------


def test_backend_is_registered_and_auto_picks_it(monkeypatch) -> None:
    monkeypatch.delenv("ALR_BACKEND", raising=False)
    assert backends.backend_unavailable_reason("cpu") is None
    assert "cpu" in alr.available_backends()
    assert backends.resolve("cpu", torch.device("cpu"), torch.float32) is _native
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) is _native
    assert {f"alr::{op}" for op in _native.OPS} <= set(alr.build_info()["cpu_kernels"])


# --- the ops directly -------------------------------------------------------------------------------


def _bucket(hyper: GroupHyper, dtype=torch.float32, shapes=((5, 3), (0,), (), (70_000,))) -> Bucket:
    params = typed_params(shapes, dtype, seed=4)
    generator = torch.Generator().manual_seed(5)

    def like(scale):
        return [(torch.randn(p.shape, generator=generator) * scale).to(dtype) for p in params]

    bucket = Bucket([p.detach() for p in params], like(1.0), [torch.tensor(3.0) for _ in params])
    if hyper.algorithm == "adam":
        bucket.state.update(exp_avg=like(0.1), exp_avg_sq=[v.abs() for v in like(0.01)])
        if hyper.amsgrad:
            bucket.state["max_exp_avg_sq"] = [v.abs() for v in like(0.02)]
    elif hyper.momentum != 0:
        bucket.state["momentum_buffer"] = like(1.0)
    if hyper.has_stream("hypergrad_prev_direction"):
        bucket.state["hypergrad_prev_direction"] = like(1.0)
    return bucket


HYPERS = {
    "adam": GroupHyper("adam", 0.01, 0.1, True, amsgrad=True, hypergrad="mult"),
    "adamw": GroupHyper("adam", 0.01, 0.1, False, decoupled_weight_decay=True, hypergrad="mult"),
    "sgd-momentum": GroupHyper("sgd", 0.01, 0.05, False, momentum=0.9, dampening=0.1, hypergrad="mult"),
    "sgd-nesterov": GroupHyper("sgd", 0.01, 0.0, True, momentum=0.9, nesterov=True, hypergrad="add"),
}


@pytest.mark.parametrize("hyper", HYPERS.values(), ids=HYPERS.keys())
def test_op_statistics_match_reference(hyper: GroupHyper) -> None:
    bucket = _bucket(hyper)
    scale, clip = torch.tensor(4.0), torch.tensor(0.5)
    assert_tensors_close(_native.grad_stats(bucket, scale), reference.grad_stats(bucket, scale), "grad_stats")
    assert_tensors_close(
        _native.hypergrad_stats(bucket, hyper, scale, clip), reference.hypergrad_stats(bucket, hyper, scale, clip), "hypergrad_stats"
    )
    expected = reference.hypergrad_stats(bucket, hyper, None, None)
    alphas = torch.full((len(bucket),), 0.01, dtype=torch.float64)
    got = _native.update(bucket, hyper, alphas, None, None, None, True)
    assert_tensors_close(got, expected, "update_ statistics (taken before the update)")
    assert _native.update(bucket, hyper, alphas, None, None, None, False) is None


def test_grad_stats_flags_nonfinite_per_tensor() -> None:
    grads = [torch.ones(100_000), torch.ones(3), torch.zeros(0), torch.ones(5, dtype=torch.float32)]
    grads[0][77_777] = float("nan")
    grads[3][4] = float("inf")
    stats = torch.ops.alr.grad_stats(grads, None)
    assert stats[:, 1].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert stats[1, 0] == 3.0 and stats[2, 0] == 0.0


def test_update_with_skip_writes_nothing() -> None:
    hyper = HYPERS["adam"]
    bucket = _bucket(hyper)
    before = [t.clone() for t in (*bucket.params, *bucket.steps, *bucket.state['exp_avg'], *bucket.state['exp_avg_sq'], *bucket.state['max_exp_avg_sq'])]
    alphas = torch.full((len(bucket),), 0.01, dtype=torch.float64)
    stats = _native.update(bucket, hyper, alphas, None, None, torch.tensor(True), True)
    after = [*bucket.params, *bucket.steps, *bucket.state['exp_avg'], *bucket.state['exp_avg_sq'], *bucket.state['max_exp_avg_sq']]
    for index, (a, b) in enumerate(zip(after, before)):
        assert_bit_identical(a, b, f"tensor {index}")
    assert torch.equal(stats, torch.zeros(len(bucket), 3))
    _native.update(bucket, hyper, alphas, None, None, torch.tensor(False), False)
    assert all(float(s) == 4.0 for s in bucket.steps)


def test_op_rejects_inconsistent_buckets() -> None:
    hyper = HYPERS["adamw"]
    bucket = _bucket(hyper)
    alphas = torch.full((len(bucket),), 0.01, dtype=torch.float64)
    bucket.grads[0] = bucket.grads[0].double()
    with pytest.raises(RuntimeError, match="grads"):
        _native.update(bucket, hyper, alphas, None, None, None, False)
    bucket = _bucket(hyper)
    bucket.state["exp_avg"] = bucket.state["exp_avg"][:-1]
    with pytest.raises(RuntimeError, match="exp_avg"):
        _native.update(bucket, hyper, alphas, None, None, None, False)


@pytest.mark.parametrize(
    ("dtype", "change", "message"),
    [
        (torch.float32, lambda b: b.state.update(exp_avg=[m.half() for m in b.state["exp_avg"]]), "state tensors must have"),
        (torch.float32, lambda b: b.state.update(exp_avg_sq=[v.bfloat16() for v in b.state["exp_avg_sq"]]), r"exp_avg_sq\[0\] has dtype"),
        (torch.float32, lambda b: b.state.update(master_param=[p.clone() for p in b.params]), "master_params are kept for bfloat16"),
        (torch.bfloat16, lambda b: b.state.update(master_param=[p.clone() for p in b.params]), r"master_params\[0\] has dtype"),
        (torch.float16, lambda b: b.state.update(rounding_key=[torch.tensor(1) for _ in b.params]), "rounding_keys round bfloat16"),
        (torch.bfloat16, lambda b: b.state.update(rounding_key=[torch.tensor(1.0) for _ in b.params]), "one-element int64"),
    ],
)
def test_op_rejects_bad_low_precision_inputs_and_writes_nothing(dtype, change, message: str) -> None:
    hyper = HYPERS["adamw"]
    bucket = _bucket(hyper, dtype=dtype)
    change(bucket)
    before = [t.clone() for t in (*bucket.params, *bucket.state['exp_avg'], *bucket.state['exp_avg_sq'], *bucket.steps)]
    with pytest.raises(RuntimeError, match=message):
        _native.update(bucket, hyper, torch.full((len(bucket),), 0.01, dtype=torch.float64), None, None, None, False)
    after = (*bucket.params, *bucket.state['exp_avg'], *bucket.state['exp_avg_sq'], *bucket.steps)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_ops_reject_sparse_gradients() -> None:
    """Sparse tensors dispatch to SparseCPU, where the ops have no kernel: a clear error
    whoever calls them (so a caller need not check every gradient's layout in Python)."""
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="SparseCPU"):
        torch.ops.alr.grad_stats([torch.ones(3, 3), sparse], None)
    hyper = HYPERS["adamw"]
    bucket = _bucket(hyper, shapes=((3, 3),))
    bucket.grads = [sparse]
    with pytest.raises(RuntimeError, match="SparseCPU"):
        _native.update(bucket, hyper, torch.full((1,), 0.01, dtype=torch.float64), None, None, None, False)


def _op_args(hyper: GroupHyper, collect: bool):
    bucket = _bucket(hyper, shapes=((5, 3), (4,)))
    algorithm = hyper.declaration
    kwargs = algorithm.kernel_arguments(hyper)
    lists = op_lists(bucket, algorithm, update=False)
    alphas = torch.full((len(bucket),), 0.01, dtype=torch.float64)
    scalars = (alphas, torch.tensor(2.0), torch.tensor(0.5), torch.tensor(False))
    update_args = (*op_lists(bucket, algorithm, update=True), *scalars)
    return bucket, lists, update_args, {**kwargs, "collect_stats": collect}, kwargs


@pytest.mark.parametrize("hyper", [HYPERS["adam"], HYPERS["sgd-nesterov"]], ids=["adam", "sgd"])
def test_opcheck(hyper: GroupHyper) -> None:
    bucket, lists, update_args, update_kwargs, kwargs = _op_args(hyper, True)
    name = hyper.algorithm
    torch.library.opcheck(torch.ops.alr.grad_stats.default, (bucket.grads, torch.tensor(2.0)))
    torch.library.opcheck(getattr(torch.ops.alr, f"{name}_hypergrad_stats").default, (*lists, torch.tensor(2.0), None), kwargs)
    torch.library.opcheck(getattr(torch.ops.alr, f"{name}_update_").default, update_args, update_kwargs)
    _, _, update_args, update_kwargs, _ = _op_args(hyper, False)
    torch.library.opcheck(getattr(torch.ops.alr, f"{name}_update_").default, update_args, update_kwargs)


# --- determinism -------------------------------------------------------------------------------------


def _deterministic_run(threads: int) -> list[Tensor]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(9)
        sizes = [100_000, 70_001, *torch.randint(1, 300, (300,), generator=generator).tolist()]
        params = typed_params([(n,) for n in sizes], torch.float32, seed=10)
        opt = alr.ALROptimizer(params, lr=1e-2, backend="cpu", max_grad_norm=1.0, hypergrad_scope="tensor")
        out = []
        for step in range(3):
            set_same_grads([params], seed=step)
            opt.step()
            out.append(torch.ops.alr.grad_stats([p.grad for p in params], None))
        return out + snapshot(opt, params) + [opt.stats().grad_norm]
    finally:
        torch.set_num_threads(previous)


def test_bit_identical_across_runs_and_thread_counts() -> None:
    runs = [_deterministic_run(1), _deterministic_run(2), _deterministic_run(2), _deterministic_run(1)]
    for run in runs[1:]:
        for index, (a, b) in enumerate(zip(run, runs[0])):
            assert_bit_identical(a, b, f"tensor {index}")


def test_bit_identical_across_instruction_sets() -> None:
    original = torch.ops.alr._cpu_isa("")
    results = {}
    try:
        for isa in ("default", "avx2", "avx512"):
            try:
                torch.ops.alr._cpu_isa(isa)
            except RuntimeError:
                continue  # not supported by this CPU
            results[isa] = _deterministic_run(2)
    finally:
        torch.ops.alr._cpu_isa(original)
    first = next(iter(results.values()))
    for isa, run in results.items():
        for index, (a, b) in enumerate(zip(run, first)):
            assert_bit_identical(a, b, f"{isa}: tensor {index}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_small_tensors_take_one_call(dtype: torch.dtype, monkeypatch) -> None:
    """The whole bucket reaches the op in one call, whatever the number of tensors."""
    calls = []
    op = _native._op
    counted = lambda name: lambda *a, **k: calls.append((name, len(a[0]))) or op(name)(*a, **k)
    monkeypatch.setattr(_native, "_op", counted)
    params = typed_params([(7,)] * 1000, dtype)
    opt = alr.AdamW(params, backend="cpu")
    set_same_grads([params], seed=0)
    opt.step()
    assert calls == [("adam_update_", 1000)]
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)
