"""ALROptimizer under DDP, FSDP2 and ZeroRedundancyOptimizer: 2 gloo ranks on CPU train
the same MLP as one process does (10 steps, clipping and the hypergradient on), and must
end where it ends; FSDP2's optimizer state survives a DCP checkpoint exactly.

The ranks run once per session (``tests/distributed_worker.py``, spawned) and save their
results; each test below checks one claim about them.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

import alr
import distributed_worker as worker
from helpers import assert_bit_identical, assert_tensors_close

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    """Where the ranks ran (once per module) and left their results and checkpoint."""
    out = tmp_path_factory.mktemp("distributed")
    torch.multiprocessing.spawn(worker.worker, args=(_free_port(), str(out)), nprocs=worker.WORLD)
    return out


@pytest.fixture(scope="module")
def ranks(out_dir: Path) -> list[dict]:
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(worker.WORLD)]


@pytest.fixture(scope="module")
def single() -> dict[str, tuple]:
    return {
        "group": worker.train_single("group"),
        "tensor": worker.train_single("tensor"),
        "two-groups": worker.train_single("group", grouped=True),
    }


def _assert_equals_single(result: dict, single: tuple, scope: str) -> None:
    params, kappa = single
    assert len(result["params"]) == len(params)
    for a, b in zip(result["params"], params):
        assert_tensors_close(a, b, "param")
    if scope == "group":  # one κ, shown once per parameter (ZeRO: per parameter of the rank's share)
        assert_tensors_close(result["kappa"][0], kappa[0], "kappa")
    else:
        assert_tensors_close(result["kappa"], kappa, "kappa")
    assert not torch.allclose(kappa, torch.ones_like(kappa))  # κ adapted
    assert not torch.equal(params[0], worker.make_model()[0].weight.detach())  # training moved it


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "zero"])
def test_distributed_run_equals_one_process(ranks, single, mode: str) -> None:
    scope = "tensor" if mode == "fsdp" else "group"
    baseline = single["two-groups" if mode == "zero" else scope]
    for rank in ranks:
        _assert_equals_single(rank[mode], baseline, scope)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "zero"])
def test_ranks_end_bit_identical(ranks, mode: str) -> None:
    """Every rank took the same decisions: the same parameters and κ, bit for bit."""
    first, second = (rank[mode] for rank in ranks)
    for a, b in zip(first["params"], second["params"]):
        assert_bit_identical(a, b, f"{mode} parameters differ between ranks")
    if mode != "zero":  # ZeRO ranks keep κ for their own partition of the tensors
        assert_bit_identical(first["kappa"], second["kappa"], f"{mode} kappa differs between ranks")


def test_fsdp_global_grad_norm_is_the_whole_models(ranks) -> None:
    """Clipping used the norm over both shards: both ranks report the same norm, which a
    local shard's norm would not be."""
    norms = [rank["fsdp"]["grad_norm"] for rank in ranks]
    assert torch.isfinite(norms[0]) and norms[0] > 0
    assert_bit_identical(norms[0], norms[1], "grad norm differs between ranks")


def test_fsdp_dcp_checkpoint_resumes_exactly(ranks) -> None:
    for rank in ranks:
        resumed, uninterrupted = rank["fsdp"]["resumed"], rank["fsdp"]
        for a, b in zip(resumed["params"], uninterrupted["params"]):
            assert_bit_identical(a, b, "resumed FSDP2 run differs from the uninterrupted one")
        assert_bit_identical(resumed["kappa"], uninterrupted["kappa"], "resumed kappa differs")


def test_fsdp_statistics_take_one_collective_per_phase(ranks) -> None:
    """One packed all_reduce for the pre-pass (Σ g², nonfinite count) and one for the
    hypergradient statistics (per-tensor κ: 3 per tensor and the count of ranks that stepped
    it): not one per tensor."""
    n_tensors = len(ranks[0]["fsdp"]["params"])
    assert ranks[0]["fsdp"]["collectives"] == [2, 4 * n_tensors]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized:UserWarning")
def test_fsdp_checkpoint_from_two_ranks_loads_on_one_process(out_dir: Path, single) -> None:
    """DCP reshards the 2-rank checkpoint (taken after step 6) into one process's plain
    tensors; continuing there on the whole batches ends where one-process training ends."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = worker.make_model()
    opt = alr.ALROptimizer(model.parameters(), hypergrad_scope="tensor", **worker.OPTIONS)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=out_dir / "checkpoint", no_dist=True)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert all(float(opt.state[p]["step"]) == worker.CHECKPOINT_STEP for p in model.parameters())
    worker.train_steps(model, opt, range(worker.CHECKPOINT_STEP, worker.STEPS), rank=None)
    _assert_equals_single({"params": list(model.parameters()), "kappa": opt.stats().kappa[0]}, single["tensor"], "tensor")


def test_zero_rank_with_an_empty_share_still_meets_the_others(ranks) -> None:
    """ZeRO put the one-tensor group on one rank only: the other rank, with nothing to step
    in it, still took part in the collectives (and the run above equals one process)."""
    shares = sorted(tuple(rank["zero"]["shares"]) for rank in ranks)
    assert [share[1] for share in shares] == [0, 1], shares


def test_stats_group_names_only_the_world() -> None:
    with pytest.raises(ValueError, match="Invalid stats_group: 'everyone'"):
        alr.ALROptimizer([torch.zeros(2, requires_grad=True)], stats_group="everyone")
