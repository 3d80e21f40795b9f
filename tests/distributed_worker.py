"""The rank side of test_distributed.py: trains the same small MLP under DDP, FSDP2 and
ZeroRedundancyOptimizer on 2 gloo ranks and saves what the test compares.

Every run sees the same global batches as :func:`train_single` (one process, whole
batch): rank r takes rows ``[r·B/2, (r+1)·B/2)``, and the data-parallel wrappers average
the gradients, which is the gradient of the whole batch's mean loss.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import alr
import alr.distributed

WORLD = 2
STEPS = 10
CHECKPOINT_STEP = 6
BATCH = 16
OPTIONS = dict(lr=1e-2, max_grad_norm=0.5, backend="auto")
"""The ALROptimizer defaults (nonfinite check, mult hypergradient) with clipping on."""


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def batch(step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(BATCH, 8, generator=generator), torch.randn(BATCH, 4, generator=generator)
    if rank is None:
        return x, y
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return x[rows], y[rows]


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int | None) -> None:
    for step in steps:
        x, y = batch(step, rank)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def two_groups(model: nn.Module) -> list[dict]:
    """Every parameter but the last, and the last bias alone without weight decay: ZeRO
    gives that one-tensor group to one rank, so the other rank's share of it is empty."""
    params = list(model.parameters())
    return [{"params": params[:-1]}, {"params": params[-1:], "weight_decay": 0.0}]


def train_single(scope: str, grouped: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The one-process run every distributed run must equal: final parameters and κ (of
    the first group)."""
    model = make_model()
    params = two_groups(model) if grouped else model.parameters()
    opt = alr.ALROptimizer(params, hypergrad_scope=scope, **OPTIONS)
    train_steps(model, opt, range(STEPS), rank=None)
    return [p.detach().clone() for p in model.parameters()], opt.stats().kappa[0]


def _result(params, opt: torch.optim.Optimizer) -> dict:
    stats = opt.stats()
    return {"params": [p.detach().clone() for p in params], "kappa": stats.kappa[0], "grad_norm": stats.grad_norm}


def run_ddp(rank: int) -> dict:
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = alr.ALROptimizer(model.parameters(), hypergrad_scope="group", **OPTIONS)
    train_steps(model, opt, range(STEPS), rank)
    return _result(model.parameters(), opt)


def _fsdp_model() -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def _counting_all_reduce():
    """Counts the all_reduce calls alr makes (FSDP's own collectives are not all_reduce)."""
    calls = []
    original = alr.distributed.dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    alr.distributed.dist.all_reduce = counting
    try:
        yield calls
    finally:
        alr.distributed.dist.all_reduce = original


def run_fsdp(rank: int, checkpoint_dir: Path) -> dict:
    """FSDP2 with per-tensor κ; a DCP checkpoint at CHECKPOINT_STEP is loaded into a fresh
    model and optimizer, which must continue exactly like the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = _fsdp_model()
    opt = alr.ALROptimizer(model.parameters(), hypergrad_scope="tensor", **OPTIONS)
    train_steps(model, opt, range(CHECKPOINT_STEP - 1), rank)
    with _counting_all_reduce() as collectives:
        train_steps(model, opt, range(CHECKPOINT_STEP - 1, CHECKPOINT_STEP), rank)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=checkpoint_dir)
    train_steps(model, opt, range(CHECKPOINT_STEP, STEPS), rank)
    uninterrupted = {**_result([p.full_tensor() for p in model.parameters()], opt), "collectives": collectives}

    resumed_model = _fsdp_model()
    resumed_opt = alr.ALROptimizer(resumed_model.parameters(), hypergrad_scope="tensor", **OPTIONS)
    state = {
        "model": get_model_state_dict(resumed_model),
        "optim": get_optimizer_state_dict(resumed_model, resumed_opt),
    }
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(resumed_model, state["model"])
    set_optimizer_state_dict(resumed_model, resumed_opt, state["optim"])
    train_steps(resumed_model, resumed_opt, range(CHECKPOINT_STEP, STEPS), rank)
    resumed = _result([p.full_tensor() for p in resumed_model.parameters()], resumed_opt)
    return {**uninterrupted, "resumed": resumed}


def run_zero(rank: int, checkpoint: Path) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = nn.parallel.DistributedDataParallel(make_model())
    groups = two_groups(model.module)
    opt = ZeroRedundancyOptimizer(
        groups[0]["params"], optimizer_class=alr.ALROptimizer, stats_group="world",
        hypergrad_scope="group", **OPTIONS,
    )  # fmt: skip
    opt.add_param_group(groups[1])
    train_steps(model, opt, range(CHECKPOINT_STEP), rank)
    # ZeRO's own checkpoint: consolidated on rank 0, saved, loaded by a fresh ZeRO on every rank.
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save(opt.state_dict(), checkpoint)
    dist.barrier()
    opt.load_state_dict(torch.load(checkpoint, weights_only=False))
    train_steps(model, opt, range(CHECKPOINT_STEP, STEPS), rank)
    shares = [len(group["params"]) for group in opt.optim.param_groups]
    return {"params": [p.detach().clone() for p in model.parameters()], "kappa": opt.optim.stats().kappa[0], "shares": shares}


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = Path(out_dir)
        results = {
            "ddp": run_ddp(rank),
            "fsdp": run_fsdp(rank, out / "checkpoint"),
            "zero": run_zero(rank, out / "zero.pt"),
        }
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
