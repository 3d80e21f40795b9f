"""Smoke test of the microbenchmark CLI (``python -m bench``) on miniature workloads.

It checks that the command runs end to end and writes what it promises; it asserts no
performance figure beyond "positive and finite".
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

TORCH_FORMS = ("torch for-loop", "torch foreach", "torch fused")
QUICK_ALR = "alr cpu"
"""--quick times the native backends only (test_build checks that the cpu one is built)."""


def test_tiny_quick_run_writes_table_json_and_charts(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = subprocess.run(
        # One thread: on a shared machine, every parallel region of a multi-threaded step can
        # wait a scheduler slice for a descheduled worker, which would make the test slow.
        [
            sys.executable,
            "-m",
            "bench",
            "--tiny",
            "--quick",
            "--threads",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| workload | algorithm | variant | implementation | ms/step |" in result.stdout
    assert "|---|" in result.stdout

    payload = json.loads((out / "results.json").read_text())
    environment = payload["environment"]
    assert environment["torch"] and environment["alr"] and environment["alr_build_info"] is not None
    rows = [row for row in payload["rows"] if row["status"] == "ok"]
    for algorithm in ("adam", "adamw", "sgd"):
        for variant in ("plain", "clip"):
            impls = {
                row["impl"] for row in rows if row["algorithm"] == algorithm and row["variant"] == variant
            }
            assert set(TORCH_FORMS) | {QUICK_ALR} <= impls, (algorithm, variant, impls)
        for variant in ("hypergrad", "defaults"):
            impls = {row["impl"] for row in rows if row["algorithm"] == algorithm and row["variant"] == variant}
            assert QUICK_ALR in impls and not any(impl.startswith("torch") for impl in impls), impls
    for row in rows:
        for key in ("median_ms", "p20_ms", "p80_ms", "gbps", "roofline_gbps", "speedup"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["times_ms"] and all(math.isfinite(t) and t > 0 for t in row["times_ms"])
    assert payload["rooflines"] and all(roof["gbps"] > 0 for roof in payload["rooflines"])

    for chart in ("speedup.png", "bandwidth.png"):
        data = (out / chart).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert (out / "results.md").read_text().strip()


def test_bytes_model_follows_the_dtypes() -> None:
    from bench.roofline import traffic

    # float32 AdamW: p, g, m, v read and p, m, v written, 4 B each.
    assert traffic("adamw", "plain", 4).bytes(1) == 28
    # bfloat16 moments: 4 + 4 + 2 + 2 read, 4 + 2 + 2 written.
    assert traffic("adamw", "bf16-state", 4).bytes(1) == 20
    assert traffic("sgd", "bf16-state", 4).bytes(1) == 16
    # bfloat16 parameters with float32 master and moments: master, g, m, v read; p, master, m, v written.
    assert traffic("adam", "master", 2).bytes(1) == 28
    # bfloat16 parameters, float32 moments, stochastic rounding: p, g, m, v read; p, m, v written.
    assert traffic("adam", "stochastic", 2).bytes(1) == 22
    assert traffic("sgd", "clip", 2).bytes(1) == 12


def test_low_precision_variants_run_against_the_plain_torch_step(tmp_path: Path) -> None:
    out = tmp_path / "results"
    variants = [arg for v in ("plain", "bf16-state", "master", "stochastic") for arg in ("--variant", v)]
    command = [sys.executable, "-m", "bench", "--tiny", "--quick", "--threads", "1", "--no-progress"]
    command += ["--dtype", "bfloat16", "--workload", "small-1000", "--algorithm", "adamw", *variants, "--out", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {row["variant"]: row for row in json.loads((out / "results.json").read_text())["rows"] if row["impl"] == QUICK_ALR}
    for variant in ("master", "stochastic", "bf16-state"):
        row = rows[variant]
        assert row["status"] == "ok", row
        assert row["baseline_impl"].startswith("torch") and row["speedup"] > 0
        assert row["peak_extra_bytes"] is not None
    assert rows["master"]["bytes_per_step"] == 2 * rows["plain"]["bytes_per_step"]  # 28 B against 14 B
