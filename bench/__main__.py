"""``python -m bench``: time one optimizer step of alr's backends against torch.optim.

For each workload (a list of parameter shapes, :mod:`bench.workloads`), algorithm (Adam,
AdamW, SGD with momentum) and variant (plain step, global-norm clipping, hypergradient
adaptation) it times torch's for-loop, foreach and fused implementations, any importable
peer (DeepSpeed CPU Adam, apex / TransformerEngine FusedAdam) and alr on every available
backend (:mod:`bench.implementations`). Each row reports the median step time with p20/p80
(:mod:`bench.timing`), GB/s from an explicit bytes model and its percentage of a memory
roofline measured in the same run (:mod:`bench.roofline`), the speedup against the fastest
torch implementation, and the peak memory the step allocates.

Outputs: a markdown table on stdout, a progress bar on stderr, and in ``--out`` (default
``bench/results/<timestamp>``) ``results.json`` (every figure and the environment),
``results.md`` and the charts ``speedup.png`` and ``bandwidth.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from alr.backends import BACKENDS

from .charts import write_charts
from .environment import CpuLoad, collect_environment
from .implementations import ALGORITHMS, DEFAULT_VARIANTS, VARIANTS, device_backends
from .report import markdown, write_json
from .runner import Config, run
from .workloads import DEFAULT_WORKLOADS, WORKLOADS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS_DIR = Path(__file__).resolve().parent / "results"

TINY_FACTOR = 256
"""``--tiny`` divides every tensor by this and keeps at most 16 tensors per workload."""


@dataclasses.dataclass(frozen=True)
class Effort:
    """Interleaved rounds per group: timed ones, untimed warm-up ones after the two set-up
    steps, and the time budget of the timed rounds (at least 3 run whatever the budget)."""

    reps: int
    warmup: int
    max_group_seconds: float


FULL = Effort(reps=30, warmup=3, max_group_seconds=60.0)
# The two set-up steps (state creation, then the profiled one) already warm every
# implementation up, so a quick run goes straight to timing.
QUICK = Effort(reps=8, warmup=0, max_group_seconds=2.0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="parameter, gradient and state dtype"
    )
    parser.add_argument(
        "--workload",
        choices=list(WORKLOADS),
        action="append",
        help="repeatable; default: mixed-34m and small-1000 on CPU, gpt2-small on CUDA",
    )
    parser.add_argument("--algorithm", choices=ALGORITHMS, action="append", help="repeatable; default: all")
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        action="append",
        help=f"repeatable; default: {', '.join(DEFAULT_VARIANTS)} (the low-precision ones by name)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        action="append",
        help="alr backend, repeatable; default: every available one for the device "
        "(--quick: without the reference when a native one runs)",
    )
    parser.add_argument(
        "--reps", type=int, help=f"timed rounds per group (default {FULL.reps}, --quick {QUICK.reps})"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help=f"untimed rounds after the set-up steps (default {FULL.warmup}, --quick {QUICK.warmup})",
    )
    parser.add_argument(
        "--max-group-seconds",
        type=float,
        help=f"time budget of a group's timed rounds (default {FULL.max_group_seconds:g}, "
        f"--quick {QUICK.max_group_seconds:g}); at least 3 rounds run",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions: under 2 minutes on a 2-core CPU"
    )
    parser.add_argument(
        "--tiny", action="store_true", help=f"shrink every workload (~{TINY_FACTOR}x; for tests only)"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    if args.device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch.cuda.is_available() is False")
        if args.device.index is None:
            # An explicit index: torch.cuda.set_device and the memory statistics need one.
            args.device = torch.device("cuda", torch.cuda.current_device())
    for name, least in (("reps", 1), ("warmup", 0), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name} must be at least {least}, got {value}")
    if args.max_group_seconds is not None and not args.max_group_seconds > 0:
        parser.error(f"--max-group-seconds must be positive, got {args.max_group_seconds}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device: torch.device = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        # CUDA events and the L2 flush use the current device.
        torch.cuda.set_device(device)
    effort = QUICK if args.quick else FULL
    workloads = [WORKLOADS[name] for name in args.workload or DEFAULT_WORKLOADS[device.type]]
    if args.tiny:
        workloads = [workload.shrunk(TINY_FACTOR) for workload in workloads]
    config = Config(
        device=device,
        dtype=DTYPES[args.dtype],
        workloads=workloads,
        algorithms=args.algorithm or list(ALGORITHMS),
        variants=args.variant or list(DEFAULT_VARIANTS),
        backends=args.backend or _default_backends(device, args.quick),
        warmup=args.warmup if args.warmup is not None else effort.warmup,
        reps=args.reps or effort.reps,
        max_group_seconds=args.max_group_seconds or effort.max_group_seconds,
        progress=not args.no_progress,
    )
    out: Path = args.out or RESULTS_DIR / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    settings = {
        **{key: value for key, value in vars(args).items() if key != "out"},
        "device": str(device),
        "out": str(out),
        "workloads": {
            w.name: {"n_tensors": w.n_tensors, "numel": w.numel, "description": w.description}
            for w in workloads
        },
        "algorithms": config.algorithms,
        "variants": config.variants,
        "reps": config.reps,
        "warmup": config.warmup,
        "max_group_seconds": config.max_group_seconds,
    }
    environment = {**collect_environment(device), "loadavg_start": _loadavg()}
    cpu_load = CpuLoad()
    rows, rooflines = run(config)
    environment["loadavg_end"] = _loadavg()
    environment["other_processes_cpu_fraction"] = cpu_load.stop()
    table = markdown(rows, rooflines, environment, settings)
    print(table, flush=True)

    write_json(out / "results.json", rows, rooflines, environment, settings)
    (out / "results.md").write_text(table + "\n")
    charts = write_charts(rows, out)
    written = ", ".join(path.name for path in [out / "results.json", out / "results.md", *charts])
    print(f"wrote {written} to {out}", file=sys.stderr)
    return 0


def _default_backends(device: torch.device, quick: bool) -> list[str]:
    """Every alr backend for the device; ``--quick`` leaves out the reference (the oracle,
    5-20× slower than torch's for-loop step: timing it took 47 of a quick run's 119 s on
    the 2-core CPU machine) unless no native backend runs here."""
    names = device_backends(device)
    native = [name for name in names if name != "reference"]
    return native if quick and native else names


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: a busy machine explains noisy timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
