"""End-to-end check of ``python -m bench.convergence --tiny``: the outputs are well formed.

One CLI run (a few steps per run, 2 lrs, 1 seed, 2 worker processes) feeds every test. The
tests check structure only (keys, counts, finite numbers, decodable PNGs, a markdown that
renders again identically), never convergence quality or timings.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("digits-logreg", "digits-mlp", "char-lm")
ALGORITHMS = ("adamw", "sgd")
CUSTOM = {"name": "add-paper", "hypergrad": "add", "hypergrad_lr": {"adamw": 1e-7, "sgd": 1e-3}}
VARIANTS = ("baseline", "mult", "add-paper")
LRS = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RUN_KEYS = {
    "task", "algorithm", "variant", "lr", "seed", "steps", "steps_done", "diverged",
    "nonfinite_steps", "skipped_steps", "final_train_loss", "final_train_loss_ema",
    "heldout_loss", "heldout_accuracy", "heldout_perplexity", "steps_to_target", "wall_s",
    "ms_per_step", "trace_steps", "loss_ema_trace",
}  # fmt: skip
KAPPA_KEYS = {"kappa_final", "kappa_peak", "kappa_low", "kappa_steps_at_max", "kappa_steps_at_min", "kappa_trace"}
SUMMARY_KEYS = {
    "task", "algorithm", "variant", "metric_name", "cells", "best_metric", "best_lr",
    "baseline_best_metric", "baseline_best_lr", "robust_range", "robust_range_contiguous",
    "baseline_robust_range", "metric_at_baseline_best_lr", "delta_at_baseline_best_lr",
    "worst_delta", "worst_delta_lr", "loss_target",
}  # fmt: skip


def _reject_constant(name: str) -> None:
    raise ValueError(f"results.json holds {name}, which is not JSON")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the CLI once; returns its output folder and its stdout."""
    out = tmp_path_factory.mktemp("convergence")
    command = [
        sys.executable, "-m", "bench.convergence", "--tiny", "--out", str(out),
        "--algorithm", ",".join(ALGORITHMS), "--variant", "baseline,mult",
        "--alr-config", json.dumps(CUSTOM), "--variant", CUSTOM["name"],
    ]  # fmt: skip
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.fixture(scope="module")
def results(sweep: tuple[Path, str]) -> dict[str, Any]:
    text = (sweep[0] / "results.json").read_text(encoding="utf-8")
    return json.loads(text, parse_constant=_reject_constant)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_every_run_is_recorded(results: dict[str, Any]) -> None:
    assert set(results) >= {"meta", "tasks", "variants", "lrs", "seeds", "summary", "runs"}
    assert set(results["tasks"]) == set(TASKS)
    assert set(results["variants"]) == set(VARIANTS)
    assert results["seeds"] == [0]
    assert all(len(results["lrs"][a]) == LRS for a in ALGORITHMS)
    runs = results["runs"]
    assert len(runs) == len(TASKS) * len(ALGORITHMS) * len(VARIANTS) * LRS
    assert {(r["task"], r["algorithm"], r["variant"], r["lr"]) for r in runs} == {
        (t, a, v, lr) for t in TASKS for a in ALGORITHMS for v in VARIANTS for lr in results["lrs"][a]
    }
    assert _is_number(results["meta"]["wall_s"]) and _is_number(results["meta"]["compute_s"])


def test_run_records_are_well_formed(results: dict[str, Any]) -> None:
    for run in results["runs"]:
        adapts = run["variant"] != "baseline"
        assert set(run) == RUN_KEYS | (KAPPA_KEYS if adapts else set()), run["variant"]
        assert run["steps_done"] == run["steps"] > 0
        for key in ("lr", "final_train_loss", "final_train_loss_ema", "heldout_loss", "wall_s", "ms_per_step"):
            assert _is_number(run[key]), (key, run[key])
        if run["task"] == "char-lm":
            assert run["heldout_accuracy"] is None and _is_number(run["heldout_perplexity"])
        else:
            assert run["heldout_perplexity"] is None and 0 <= run["heldout_accuracy"] <= 100
        assert run["steps_to_target"] is None or 1 <= run["steps_to_target"] <= run["steps"]
        assert run["trace_steps"][-1] == run["steps_done"]
        assert len(run["loss_ema_trace"]) == len(run["trace_steps"])
        assert all(_is_number(v) for v in run["loss_ema_trace"])
        if adapts:
            assert len(run["kappa_trace"]) == len(run["trace_steps"])
            assert all(_is_number(k) and k > 0 for k in run["kappa_trace"])


def test_summaries_are_well_formed(results: dict[str, Any]) -> None:
    summaries = results["summary"]
    assert len(summaries) == len(TASKS) * len(ALGORITHMS) * len(VARIANTS)
    for s in summaries:
        assert set(s) == SUMMARY_KEYS
        assert s["metric_name"] == ("perplexity" if s["task"] == "char-lm" else "accuracy")
        assert len(s["cells"]) == LRS
        for key in ("robust_range", "robust_range_contiguous", "baseline_robust_range", "loss_target"):
            assert _is_number(s[key]) and s[key] >= 0, key
        assert s["robust_range_contiguous"] <= s["robust_range"]
        assert s["baseline_best_lr"] in results["lrs"][s["algorithm"]]
        for cell in s["cells"]:
            assert _is_number(cell["metric"]) and _is_number(cell["train_loss"])
            assert len(cell["metric_per_seed"]) == 1 and isinstance(cell["robust"], bool)


def test_markdown_is_printed_and_complete(sweep: tuple[Path, str]) -> None:
    out, stdout = sweep
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert text.strip() and text.strip() in stdout
    assert "## Summary" in text and "robust range (dec)" in text
    for task in TASKS:
        for algorithm in ALGORITHMS:
            assert f"## {task} · {algorithm}" in text
    assert all(variant in text for variant in VARIANTS)
    assert not re.search(r"\b(nan|inf)\b", text), "a non-finite number reached a table"


def test_pngs_are_written(sweep: tuple[Path, str]) -> None:
    out = sweep[0]
    for task in TASKS:
        for algorithm in ALGORITHMS:
            for kind in ("sensitivity", "kappa"):
                data = (out / f"{kind}-{task}-{algorithm}.png").read_bytes()
                assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_render_reproduces_the_markdown(
    sweep: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = sweep[0]
    monkeypatch.syspath_prepend(str(ROOT))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_bytes((out / "results.json").read_bytes())
    from bench.convergence.cli import main

    assert main(["--render", str(copy)]) == 0
    assert (copy / "summary.md").read_text(encoding="utf-8") == (out / "summary.md").read_text(encoding="utf-8")
    assert len(list(copy.glob("*.png"))) == len(list(out.glob("*.png")))
