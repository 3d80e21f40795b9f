"""What the numbers were measured on: hardware, versions, build and commit."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import alr

__all__ = ["CpuLoad", "collect_environment"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def collect_environment(device: torch.device) -> dict[str, Any]:
    """A JSON-ready description of the machine and software (no device query but ``device``'s)."""
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench", *sys.argv[1:]],
        "device": str(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        # The installed version only: importing Triton just to read it is slow and may fail.
        "triton": _installed_version("triton"),
        "alr": alr.__version__,
        "alr_backends": alr.available_backends(),
        "alr_build_info": alr.build_info(),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": _git_dirty(),
    }


class CpuLoad:
    """How much of the machine's CPU time other processes took between start and :meth:`stop`.

    Busy time of all CPUs from ``/proc/stat`` (including a VM's steal time) minus this
    process's own CPU time, as a fraction of ``wall time × CPUs``. Other jobs competing for
    the cores is what makes CPU timings noisy: with every core given to torch threads, one
    descheduled thread stalls each parallel region for a whole scheduler slice. Linux only;
    elsewhere the fraction is None.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal: idle and iowait are not busy.
        busy_ticks = sum(int(x) for i, x in enumerate(fields[1:9]) if i not in (3, 4))
        own = os.times()
        return busy_ticks / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()

    def stop(self) -> float | None:
        """The fraction (0 to 1) of all CPU time that other processes used."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        capacity = wall * (os.cpu_count() or 1)
        return None if capacity <= 0 else min(1.0, max(0.0, (busy - own) / capacity))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def _git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (the SHA alone would then be misleading)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)
