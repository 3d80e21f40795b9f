"""The ``cpu`` backend (alr._C's ops through alr._native) against the reference backend.

Parity tests run ``ALROptimizer(backend="cpu")`` and ``ALROptimizer(backend="reference")``
on identical clones for several steps and compare the parameters, every state entry and κ
after every step with ``helpers.assert_optimizer_state_close`` (the one tolerance rule).
The backend is also bit-deterministic: across runs, thread counts and instruction sets.
The element math and the chunking are tested natively as well (csrc/tests, via ctest).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

import alr
from alr import _native, backends, reference
from alr.bucket import Bucket, GroupHyper
from helpers import (
    SHAPES,
    assert_bit_identical,
    assert_optimizer_state_close,
    assert_tensors_close,
    snapshot,
)

pytestmark = pytest.mark.skipif(
    backends.backend_unavailable_reason("cpu") is not None,
    reason=f"cpu backend unavailable: {backends.backend_unavailable_reason('cpu')}",
)

STEPS = 7


@pytest.fixture(autouse=True)
def _one_thread():
    """The reference backend runs hundreds of tiny torch ops per step, whose intra-op
    parallel regions crawl when other jobs hold the cores; one thread keeps the file fast.
    Thread-count independence of the cpu backend is tested (bitwise) on its own below."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)]

ADAM = {
    "adamw": dict(algorithm="adamw", hypergrad="off", skip_nonfinite=False),
    "adamw-wd-amsgrad-maximize": dict(algorithm="adamw", weight_decay=0.1, amsgrad=True, maximize=True, hypergrad="off"),
    "adam-coupled-wd": dict(algorithm="adam", weight_decay=0.1, hypergrad="off"),
    # 1 - beta1 = 0.7 takes the other branch of torch's lerp.
    "adam-amsgrad-beta1-0.3": dict(algorithm="adam", amsgrad=True, betas=(0.3, 0.99), hypergrad="off"),
    "adamw-mult-group": dict(algorithm="adamw", hypergrad="mult", hypergrad_lr=0.05),
    "adamw-mult-tensor-exact": dict(algorithm="adamw", hypergrad="mult", hypergrad_lr=0.05, hypergrad_scope="tensor", hypergrad_exact=True),
    "adam-add-tensor-wd": dict(algorithm="adam", weight_decay=0.05, hypergrad="add", hypergrad_lr=1e-4, hypergrad_scope="tensor"),
    "adam-add-exact-amsgrad-clip": dict(algorithm="adam", amsgrad=True, hypergrad="add", hypergrad_lr=1e-4, hypergrad_exact=True, max_grad_norm=1.0),
    "adamw-mult-clip-maximize": dict(algorithm="adamw", maximize=True, max_grad_norm=0.5, hypergrad="mult", hypergrad_lr=0.05),
}
SGD = {
    "sgd-plain": dict(algorithm="sgd", hypergrad="off"),
    "sgd-plain-mult-wd": dict(algorithm="sgd", weight_decay=0.05, hypergrad="mult", hypergrad_lr=0.05),
    "sgd-momentum": dict(algorithm="sgd", momentum=0.9, hypergrad="off"),
    "sgd-momentum-mult": dict(algorithm="sgd", momentum=0.9, hypergrad="mult", hypergrad_lr=0.05),
    "sgd-dampening-wd": dict(algorithm="sgd", momentum=0.9, dampening=0.3, weight_decay=0.05, hypergrad="off"),
    "sgd-dampening-add-exact-tensor": dict(
        algorithm="sgd", momentum=0.9, dampening=0.3, hypergrad="add", hypergrad_lr=1e-3, hypergrad_exact=True, hypergrad_scope="tensor"
    ),
    "sgd-nesterov-mult-clip-maximize": dict(
        algorithm="sgd", momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True, max_grad_norm=1.0, hypergrad="mult", hypergrad_lr=0.05
    ),
    "sgd-nesterov-exact": dict(algorithm="sgd", momentum=0.9, nesterov=True, hypergrad="mult", hypergrad_lr=0.05, hypergrad_exact=True),
}
CONFIGS = {**ADAM, **SGD}
LR = {"adam": 1e-2, "sgd": 5e-2}


def _lr(options: dict) -> float:
    return LR["sgd" if options["algorithm"] == "sgd" else "adam"]


def _pair(make_params, options: dict) -> tuple[list[Tensor], torch.optim.Optimizer, list[Tensor], torch.optim.Optimizer]:
    """The same parameters (layouts included) under the cpu and the reference backend."""
    ps, qs = make_params(), make_params()
    options = {"lr": _lr(options), **options}
    return ps, alr.ALROptimizer(ps, backend="cpu", **options), qs, alr.ALROptimizer(qs, backend="reference", **options)


def _params(shapes, dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]


def _set_grads(param_sets, seed: int, scale: float = 1.0, like_param: bool = True, poison=None) -> None:
    """Identical random gradients for every set; in the parameter's layout unless like_param=False."""
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(p.shape, generator=generator).to(p.dtype) * scale for p in param_sets[0]]
    if poison is not None:
        index, value = poison
        values[index].view(-1)[0] = value
    for params in param_sets:
        for p, v in zip(params, values):
            p.grad = torch.empty_like(p).copy_(v) if like_param else v.clone()


def _assert_kappa_close(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.stats(), b.stats()
    for ka, kb in zip(sa.kappa, sb.kappa):
        assert_tensors_close(ka, kb, "kappa")
    if not (sa.grad_norm.isnan() and sb.grad_norm.isnan()):  # NaN until a pre-pass ran
        assert_tensors_close(sa.grad_norm, sb.grad_norm, "grad_norm")
    assert torch.equal(sa.skipped_steps, sb.skipped_steps)


def _assert_all_close(cpu, ps, ref, qs) -> None:
    """assert_optimizer_state_close's comparison, batched: one concatenated tensor per state
    key (same dtype, same tolerance), so hundreds of tensors cost one comparison."""
    assert_tensors_close(torch.cat([p.detach().reshape(-1) for p in ps]), torch.cat([q.detach().reshape(-1) for q in qs]), "params")
    for key in ref.state[qs[0]]:
        expected = [ref.state[q][key] for q in qs]
        actual = [cpu.state[p][key] for p in ps]
        if key == "step":
            assert [float(a) for a in actual] == [float(e) for e in expected]
        else:
            assert_tensors_close(torch.cat([a.reshape(-1) for a in actual]), torch.cat([e.reshape(-1) for e in expected]), key)


def _run_parity(make_params, options: dict, steps: int = STEPS, grad_scale: float = 1.0, like_param: bool = True):
    ps, cpu, qs, ref = _pair(make_params, options)
    for step in range(steps):
        _set_grads([ps, qs], seed=step, scale=grad_scale, like_param=like_param)
        cpu.step()
        ref.step()
        if len(ps) > 20:
            # Hundreds of small tensors: batched every step, one by one for the others.
            _assert_all_close(cpu, ps, ref, qs)
            special = [i for i, p in enumerate(ps) if not (p.dim() == 1 and 0 < p.numel() < 200)]
            assert_optimizer_state_close(cpu, [ps[i] for i in special], ref, [qs[i] for i in special])
        else:
            assert_optimizer_state_close(cpu, ps, ref, qs)
        _assert_kappa_close(cpu, ref)
    return ps, cpu


# --- registration ------------------------------------------------------------------------------


def test_backend_is_registered_and_auto_picks_it(monkeypatch) -> None:
    monkeypatch.delenv("ALR_BACKEND", raising=False)
    assert backends.backend_unavailable_reason("cpu") is None
    assert "cpu" in alr.available_backends()
    assert backends.resolve("cpu", torch.device("cpu")) is _native
    assert backends.resolve("auto", torch.device("cpu")) is _native
    assert {"alr::grad_stats", "alr::hypergrad_stats", "alr::update_"} <= set(alr.build_info()["cpu_kernels"])


# --- parity with the reference ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_parity_every_option(options: dict, dtype: torch.dtype) -> None:
    _run_parity(lambda: _params([*SHAPES, (40,)], dtype), options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ["adamw-mult-group", "sgd-nesterov-mult-clip-maximize"])
def test_parity_with_grad_scaler(config: str, dtype: torch.dtype) -> None:
    """GradScaler hands its scale (and found_inf) to step(): unscaling happens in the kernel."""
    scale = 2.0**9
    ps, cpu, qs, ref = _pair(lambda: _params(SHAPES, dtype), CONFIGS[config])
    for step in range(STEPS):
        _set_grads([ps, qs], seed=step, scale=scale)
        found = float(step == 3)  # one overflowing step: skipped by both
        for opt in (cpu, ref):
            opt.grad_scale = torch.tensor(scale)
            opt.found_inf = torch.tensor(found)
        cpu.step()
        ref.step()
        assert_optimizer_state_close(cpu, ps, ref, qs)
        _assert_kappa_close(cpu, ref)
    assert int(cpu.stats().skipped_steps) == 1


def _layout_params(dtype: torch.dtype) -> list[Tensor]:
    """Zero-size, scalar, odd sizes, larger than a chunk, ~300 small tensors whose packing
    crosses task boundaries, a transposed leaf, a channels-last leaf, a non-dense leaf."""
    generator = torch.Generator().manual_seed(1)
    small = [(int(n),) for n in torch.randint(1, 200, (300,), generator=generator)]
    shapes = [(0,), (), (4097,), (1024, 33), (40_000,), *small]
    params = _params(shapes, dtype, seed=2)
    transposed = torch.randn(33, 20, generator=generator).to(dtype).t()
    channels_last = torch.randn(2, 3, 5, 4, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    strided = torch.randn(9, 16, generator=generator).to(dtype)[:, ::2]
    return params + [t.detach().requires_grad_() for t in (transposed, channels_last, strided)]


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
@pytest.mark.parametrize("config", ["adamw-mult-tensor-exact", "adam-add-exact-amsgrad-clip", "sgd-nesterov-mult-clip-maximize"])
def test_parity_shapes_and_layouts(config: str, dtype: torch.dtype) -> None:
    ps, cpu = _run_parity(lambda: _layout_params(dtype), {**CONFIGS[config], "max_grad_norm": 50.0}, steps=4)
    transposed, channels_last = ps[-3], ps[-2]
    assert transposed.stride() == (1, 20) and channels_last.is_contiguous(memory_format=torch.channels_last)
    for key, value in cpu.state[channels_last].items():
        if value.dim() == 4:
            assert value.is_contiguous(memory_format=torch.channels_last), key


def test_parity_grad_layout_differs_from_param() -> None:
    """A contiguous gradient for a transposed or channels-last parameter goes through the
    staged (copying) path and gives the same results."""
    _run_parity(lambda: _layout_params(torch.float32)[-3:], CONFIGS["adamw-mult-group"], steps=4, like_param=False)
    _run_parity(lambda: _layout_params(torch.float32)[-3:], CONFIGS["sgd-momentum-mult"], steps=4, like_param=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ["adamw-mult-group", "adam-add-exact-amsgrad-clip", "sgd-nesterov-mult-clip-maximize", "sgd-plain-mult-wd"])
def test_nonfinite_step_is_skipped_bit_identically(config: str, dtype: torch.dtype) -> None:
    options = {**CONFIGS[config], "skip_nonfinite": True}
    ps, cpu, qs, ref = _pair(lambda: _params([*SHAPES, (300,)], dtype), options)
    poisons = {2: (1, float("inf")), 4: (5, float("nan")), 5: (0, float("-inf"))}
    for step in range(STEPS):
        _set_grads([ps, qs], seed=step, poison=poisons.get(step))
        before = snapshot(cpu, ps)
        cpu.step()
        ref.step()
        if step in poisons:
            for index, (a, b) in enumerate(zip(snapshot(cpu, ps), before)):
                assert_bit_identical(a, b, f"tensor {index} changed by a skipped step")
        assert_optimizer_state_close(cpu, ps, ref, qs)
        _assert_kappa_close(cpu, ref)
    assert int(cpu.stats().skipped_steps) == len(poisons)


# --- the ops directly -------------------------------------------------------------------------------


def _bucket(hyper: GroupHyper, dtype=torch.float32, shapes=((5, 3), (0,), (), (70_000,))) -> Bucket:
    params = _params(shapes, dtype, seed=4)
    generator = torch.Generator().manual_seed(5)

    def like(scale):
        return [(torch.randn(p.shape, generator=generator) * scale).to(dtype) for p in params]

    bucket = Bucket([p.detach() for p in params], like(1.0), [torch.tensor(3.0) for _ in params])
    if hyper.algorithm == "adam":
        bucket.exp_avgs, bucket.exp_avg_sqs = like(0.1), [v.abs() for v in like(0.01)]
        if hyper.amsgrad:
            bucket.max_exp_avg_sqs = [v.abs() for v in like(0.02)]
    elif hyper.momentum != 0:
        bucket.momentum_buffers = like(1.0)
    if hyper.needs_prev_direction:
        bucket.prev_directions = like(1.0)
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
    before = [t.clone() for t in (*bucket.params, *bucket.steps, *bucket.exp_avgs, *bucket.exp_avg_sqs, *bucket.max_exp_avg_sqs)]
    alphas = torch.full((len(bucket),), 0.01, dtype=torch.float64)
    stats = _native.update(bucket, hyper, alphas, None, None, torch.tensor(True), True)
    after = [*bucket.params, *bucket.steps, *bucket.exp_avgs, *bucket.exp_avg_sqs, *bucket.max_exp_avg_sqs]
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
    bucket.exp_avgs = bucket.exp_avgs[:-1]
    with pytest.raises(RuntimeError, match="exp_avgs"):
        _native.update(bucket, hyper, alphas, None, None, None, False)


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
    kwargs = dict(_native._hyper_kwargs(hyper))
    lists = (
        bucket.params, bucket.grads, bucket.steps, bucket.exp_avgs, bucket.exp_avg_sqs,
        bucket.max_exp_avg_sqs, bucket.momentum_buffers, bucket.prev_directions,
    )
    alphas = torch.full((len(bucket),), 0.01, dtype=torch.float64)
    update_args = (*lists, alphas, torch.tensor(2.0), torch.tensor(0.5), torch.tensor(False))
    return bucket, lists, update_args, {**kwargs, "collect_stats": collect}, kwargs


@pytest.mark.parametrize("hyper", [HYPERS["adam"], HYPERS["sgd-nesterov"]], ids=["adam", "sgd"])
def test_opcheck(hyper: GroupHyper) -> None:
    bucket, lists, update_args, update_kwargs, kwargs = _op_args(hyper, True)
    torch.library.opcheck(torch.ops.alr.grad_stats.default, (bucket.grads, torch.tensor(2.0)))
    torch.library.opcheck(torch.ops.alr.hypergrad_stats.default, (*lists, torch.tensor(2.0), None), kwargs)
    torch.library.opcheck(torch.ops.alr.update_.default, update_args, update_kwargs)
    _, _, update_args, update_kwargs, _ = _op_args(hyper, False)
    torch.library.opcheck(torch.ops.alr.update_.default, update_args, update_kwargs)


# --- determinism -------------------------------------------------------------------------------------


def _deterministic_run(threads: int) -> list[Tensor]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(9)
        sizes = [100_000, 70_001, *torch.randint(1, 300, (300,), generator=generator).tolist()]
        params = _params([(n,) for n in sizes], torch.float32, seed=10)
        opt = alr.ALROptimizer(params, lr=1e-2, backend="cpu", max_grad_norm=1.0, hypergrad_scope="tensor")
        out = []
        for step in range(3):
            _set_grads([params], seed=step)
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
    update = _native._update
    monkeypatch.setattr(_native, "_update", lambda *a, **k: calls.append(len(a[0])) or update(*a, **k))
    params = _params([(7,)] * 1000, dtype)
    opt = alr.AdamW(params, backend="cpu")
    _set_grads([params], seed=0)
    opt.step()
    assert calls == [1000]
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)
