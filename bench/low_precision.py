"""Low-precision training with ``alr.ALROptimizer``: bf16 against fp32 on two tasks.

What is measured: the final training loss of the digits MLP and of the character LM of the
convergence benchmark (:mod:`bench.convergence.tasks`, full size: 880 and 1,500 steps),
trained with AdamW (``algorithm="adamw"``, every other setting the ALROptimizer default)
at one learning rate, in these variants:

* ``fp32``: the fp32 model (the reference).
* ``bf16-nearest``: the model cast to bfloat16, plain: parameters rounded to nearest-even
  after every step, moments in bfloat16.
* ``bf16-stochastic``: bfloat16 model, ``stochastic_rounding=True`` (``rounding_seed`` =
  the run's seed); moments in float32 (the default with this option).
* ``bf16-master``: bfloat16 model, ``master_weights=True`` (an fp32 master copy in the
  optimizer state; the parameter is its rounded image); moments in float32 (the default).
* ``bf16-master-bf16-state``: as ``bf16-master`` with ``state_dtype=torch.bfloat16``.
* ``fp32-bf16-state``: fp32 model, ``state_dtype=torch.bfloat16``.
* ``bf16-stochastic-bf16-state`` (on request): as ``bf16-stochastic`` with bfloat16 moments.

How: a run seeds torch's global generator, builds the fp32 model, casts it, and trains on
the task's minibatch stream for that seed (same initial weights and batches for every
variant of a seed). Float inputs are cast to the model's dtype (the LM's token ids are left
alone); the forward and backward run in the model's dtype and the loss is taken in fp32
(``logits.float()``). Recorded per run: the bias-corrected EMA (decay 0.98, as the
convergence benchmark) of the minibatch loss after every step, and the evaluation of an
fp32 copy of the final model (:meth:`Task.evaluate`: loss over the training split,
held-out loss and accuracy or perplexity). The summary gives, per task and variant, the
medians over seeds and the relative difference to ``fp32`` in %, both as the median of
the per-seed paired differences (same seed, same init and batches) and their range.

Each run is on one thread; runs go to 2 spawned worker processes. Outputs in ``--out``:
``summary.md`` (also printed), ``results.json`` and ``low-precision.png`` (training-loss
EMA against the step, median over seeds, one panel per task); ``--render`` redoes the
first and the last from ``results.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import alr
from bench.convergence.tasks import get_task
from bench.convergence.train import LossEMA

TASKS = ("digits-mlp", "char-lm")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "low-precision"
DEFAULT_LR = 1e-3
DEFAULT_SEEDS = 3
WORKERS = 2
TRACE_EVERY = 10
"""Steps between the points of a run's loss-EMA trace in ``results.json``."""
GOAL_PERCENT = 1.0
"""The issue's target: within 1% of the fp32 final loss."""
REFERENCE = "fp32"


@dataclass(frozen=True)
class Variant:
    """A model dtype plus keyword arguments for :class:`alr.ALROptimizer`."""

    name: str
    dtype: torch.dtype
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        options = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in self.options.items()}
        return {"model_dtype": str(self.dtype), "options": options}


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(REFERENCE, torch.float32),
        Variant("bf16-nearest", torch.bfloat16),
        Variant("bf16-stochastic", torch.bfloat16, {"stochastic_rounding": True}),
        Variant("bf16-master", torch.bfloat16, {"master_weights": True}),
        Variant("fp32-bf16-state", torch.float32, {"state_dtype": torch.bfloat16}),
        Variant("bf16-master-bf16-state", torch.bfloat16, {"master_weights": True, "state_dtype": torch.bfloat16}),
        Variant(
            "bf16-stochastic-bf16-state", torch.bfloat16, {"stochastic_rounding": True, "state_dtype": torch.bfloat16}
        ),
    )
}
DEFAULT_VARIANTS = ("fp32", "bf16-nearest", "bf16-stochastic", "bf16-master", "bf16-master-bf16-state", "fp32-bf16-state")
"""``bf16-stochastic-bf16-state`` runs on request, with ``--variants``."""


@dataclass(frozen=True)
class RunSpec:
    task: str
    variant: str
    lr: float
    seed: int
    hypergrad: str
    tiny: bool


def _quiet() -> None:
    """One thread per run, and no CPU-fallback warning from ``backend="auto"``."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=alr.ALRBackendFallbackWarning)


def _optimizer(spec: RunSpec, variant: Variant, model: nn.Module) -> alr.ALROptimizer:
    options = dict(variant.options)
    if options.get("stochastic_rounding"):
        options["rounding_seed"] = spec.seed
    return alr.ALROptimizer(
        model.parameters(), spec.lr, algorithm="adamw", hypergrad=spec.hypergrad, backend="auto", **options
    )


def _cast_input(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype) if x.is_floating_point() else x


def run(spec: RunSpec) -> dict[str, Any]:
    """Train and evaluate one run; deterministic given ``spec``."""
    _quiet()
    task, variant = get_task(spec.task, spec.tiny), VARIANTS[spec.variant]
    next(task.batches(spec.seed))  # loads and caches the data set outside the timing
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    model = task.build_model().to(variant.dtype)
    opt = _optimizer(spec, variant, model)
    ema, trace = LossEMA(), []
    for x, y in task.batches(spec.seed):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(_cast_input(x, variant.dtype)).float(), y)
        loss.backward()
        opt.step()
        trace.append(ema.update(loss.item()))
    evaluation = task.evaluate(copy.deepcopy(model).float())
    steps = list(range(TRACE_EVERY, len(trace), TRACE_EVERY)) + [len(trace)]
    return {
        **asdict(spec),
        "steps": len(trace),
        "final_train_loss_ema": trace[-1],
        "final_train_loss": evaluation.train_loss,
        "heldout_loss": evaluation.heldout_loss,
        "heldout_accuracy": evaluation.heldout_accuracy,
        "heldout_perplexity": evaluation.heldout_perplexity,
        "wall_s": time.perf_counter() - start,
        "trace_steps": steps,
        "loss_ema_trace": [trace[s - 1] for s in steps],
    }


def execute(specs: Sequence[RunSpec], workers: int) -> list[dict[str, Any]]:
    """Every run, on ``workers`` spawned processes (in this one when 1), in spec order."""
    if workers <= 1:
        return [run(s) for s in specs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(run, specs))


def _percent(value: float, reference: float) -> float:
    return 100.0 * (value - reference) / reference


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _spread(values: Sequence[float]) -> float:
    """Seed-to-seed spread of one variant: (max − min) / median, in %; the noise floor of a Δ."""
    return 100.0 * (max(values) - min(values)) / _median(values)


def _metric(r: dict[str, Any]) -> float:
    return r["heldout_perplexity"] if r["heldout_accuracy"] is None else r["heldout_accuracy"]


def _select(runs: Sequence[dict[str, Any]], hypergrad: str, task: str, variant: str) -> list[dict[str, Any]]:
    """The runs (one per seed) of a task and variant."""
    return [r for r in runs if (r["hypergrad"], r["task"], r["variant"]) == (hypergrad, task, variant)]


def summarize(runs: Sequence[dict[str, Any]], hypergrad: str, task: str, variant: str) -> dict[str, Any]:
    """Medians over seeds, and the per-seed paired relative differences to ``fp32``."""
    cell = {r["seed"]: r for r in _select(runs, hypergrad, task, variant)}
    ref = {r["seed"]: r for r in _select(runs, hypergrad, task, REFERENCE)}
    summary: dict[str, Any] = {"task": task, "variant": variant, "hypergrad": hypergrad, "seeds": sorted(cell)}
    for key in ("final_train_loss_ema", "final_train_loss"):
        deltas = [_percent(cell[s][key], ref[s][key]) for s in sorted(cell)]
        summary[key] = _median(r[key] for r in cell.values())
        summary[f"{key}_delta_percent"] = _median(deltas)
        summary[f"{key}_delta_percent_range"] = [min(deltas), max(deltas)]
        summary[f"{key}_seed_spread_percent"] = _spread([r[key] for r in cell.values()])
    summary["heldout_metric_name"] = "perplexity" if task == "char-lm" else "accuracy"
    summary["heldout_metric"] = _median(_metric(r) for r in cell.values())
    summary["wall_s"] = _median(r["wall_s"] for r in cell.values())
    return summary


def _row(s: dict[str, Any]) -> str:
    def delta(key: str) -> str:
        if s["variant"] == REFERENCE:
            return f"seed spread {s[f'{key}_seed_spread_percent']:.2f}"
        low, high = s[f"{key}_delta_percent_range"]
        return f"{s[f'{key}_delta_percent']:+.2f} [{low:+.2f}, {high:+.2f}]"

    metric = f"{s['heldout_metric']:.2f}" + ("%" if s["heldout_metric_name"] == "accuracy" else "")
    within = s["final_train_loss_delta_percent"] <= GOAL_PERCENT
    cells = [
        s["task"], s["variant"], f"{s['final_train_loss_ema']:.4g}", delta("final_train_loss_ema"),
        f"{s['final_train_loss']:.4g}", delta("final_train_loss"), "yes" if within else "no",
        f"{s['heldout_metric_name']} {metric}", f"{s['wall_s']:.1f}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| task | variant | train loss EMA | Δ vs fp32 % [range] | train loss (eval) | Δ vs fp32 % [range] "
    f"| ≤ fp32 +{GOAL_PERCENT:g}% | held-out | s/run |\n|---|---|---|---|---|---|---|---|---|"
)


def markdown(results: dict[str, Any]) -> str:
    """The summary tables, one per hypergrad mode."""
    meta = results["meta"]
    lines = [
        "# Low-precision training (bf16) with ALROptimizer",
        "",
        (
            f"AdamW, lr {meta['lr']:g}, seeds {meta['seeds']}, steps {meta['steps']}; medians over seeds. "
            "Δ: median of the per-seed paired relative differences to fp32 (same init and batches), "
            "[min, max] over seeds; the fp32 row gives instead its seed spread, (max − min) / median "
            "in %. Train loss EMA: EMA (decay 0.98) of the minibatch loss at the last step, forward in "
            "the model's dtype. Train loss (eval): cross-entropy of an fp32 copy of the final model "
            f"over the training split; the goal, at most {GOAL_PERCENT:g}% above fp32, is judged on it."
        ),
        f"Wall time {meta['wall_s']:.0f} s on {meta['workers']} worker processes, one thread each.",
    ]
    for hypergrad in meta["hypergrad"]:
        lines += ["", f"## hypergrad={hypergrad}", "", HEADER]
        lines += [_row(s) for s in results["summary"] if s["hypergrad"] == hypergrad]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Training-loss EMA against the step, median over seeds, one panel per task and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    panels = [(t, h) for h in meta["hypergrad"] for t in meta["tasks"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (task, hypergrad) in zip(axes[0], panels):
        for variant in meta["variants"]:
            runs = _select(results["runs"], hypergrad, task, variant)
            traces = torch.tensor([r["loss_ema_trace"] for r in runs], dtype=torch.float64)
            style = {"color": "black", "linewidth": 2.2} if variant == REFERENCE else {"linewidth": 1.3}
            ax.plot(runs[0]["trace_steps"], traces.median(dim=0).values.numpy(), label=variant, **style)
        low, high = ax.get_ylim()
        ax.set_yscale("log" if high > 10 * low else "linear")
        ax.set_title(f"{task} · AdamW lr {meta['lr']:g} · hypergrad={hypergrad}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (EMA)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.low_precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--tiny", action="store_true", help="a few steps and 1 seed (tests)")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {DEFAULT_SEEDS})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW learning rate")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}"
    )
    parser.add_argument("--hypergrad", default="mult", help="comma-separated hypergrad modes, e.g. mult,off")
    parser.add_argument("--render", action="store_true", help="redo summary.md and the PNG from --out's results.json")
    parser.add_argument("--workers", type=int, default=WORKERS, help="worker processes")
    args = parser.parse_args(argv)
    args.tasks, args.variants, args.hypergrad = (
        [x.strip() for x in text.split(",") if x.strip()] for text in (args.tasks, args.variants, args.hypergrad)
    )
    unknown = [v for v in args.variants if v not in VARIANTS] + [t for t in args.tasks if t not in TASKS]
    if unknown or REFERENCE not in args.variants:
        parser.error(f"unknown task or variant {unknown}, or {REFERENCE!r} missing from --variants")
    args.seeds = args.seeds or (1 if args.tiny else DEFAULT_SEEDS)
    return args


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """``summary.md`` and the PNG in ``out``; the markdown is also printed."""
    text = markdown(results)
    (out / "summary.md").write_text(text, encoding="utf-8")
    plot(results, out / "low-precision.png")
    print(text, end="")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        write_outputs(json.loads((args.out / "results.json").read_text(encoding="utf-8")), args.out)
        return 0
    specs = [
        RunSpec(task, variant, args.lr, seed, hypergrad, args.tiny)
        for hypergrad in args.hypergrad
        for task in args.tasks
        for variant in args.variants
        for seed in range(args.seeds)
    ]
    start = time.perf_counter()
    runs = execute(specs, args.workers)
    meta = {
        "command": " ".join(["python -m bench.low_precision", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "lr": args.lr,
        "seeds": list(range(args.seeds)),
        "tasks": args.tasks,
        "variants": args.variants,
        "hypergrad": args.hypergrad,
        "steps": {t: get_task(t, args.tiny).size.steps for t in args.tasks},
        "tiny": args.tiny,
        "workers": args.workers,
        "wall_s": time.perf_counter() - start,
    }
    results = {
        "meta": meta,
        "variant_settings": {v: VARIANTS[v].describe() for v in args.variants},
        "summary": [summarize(runs, h, t, v) for h in args.hypergrad for t in args.tasks for v in args.variants],
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    write_outputs(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
