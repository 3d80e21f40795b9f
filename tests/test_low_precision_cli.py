"""End-to-end check of ``python -m bench.low_precision --tiny``: the outputs are well formed.

One CLI run (a few steps per run, 1 seed, 2 worker processes) feeds every test. The tests
check structure only (every task × variant present, finite numbers, a decodable PNG),
never how close bf16 training comes to fp32.
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

from bench.low_precision import DEFAULT_VARIANTS as VARIANTS
from bench.low_precision import TASKS

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_NUMBERS = ("final_train_loss_ema", "final_train_loss", "heldout_loss", "wall_s")
SUMMARY_NUMBERS = (
    "final_train_loss_ema", "final_train_loss_ema_delta_percent", "final_train_loss",
    "final_train_loss_delta_percent", "heldout_metric", "wall_s",
)  # fmt: skip


def _reject_constant(name: str) -> None:
    raise ValueError(f"results.json holds {name}, which is not JSON")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the CLI once; returns its output folder and its stdout."""
    out = tmp_path_factory.mktemp("low-precision")
    command = [sys.executable, "-m", "bench.low_precision", "--tiny", "--out", str(out)]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.fixture(scope="module")
def results(cli: tuple[Path, str]) -> dict[str, Any]:
    text = (cli[0] / "results.json").read_text(encoding="utf-8")
    return json.loads(text, parse_constant=_reject_constant)


def test_every_run_is_recorded(results: dict[str, Any]) -> None:
    assert set(results) == {"meta", "variant_settings", "summary", "runs"}
    assert results["meta"]["seeds"] == [0] and results["meta"]["tiny"] is True
    assert set(results["variant_settings"]) == set(VARIANTS)
    assert {(r["task"], r["variant"]) for r in results["runs"]} == {(t, v) for t in TASKS for v in VARIANTS}
    assert len(results["runs"]) == len(TASKS) * len(VARIANTS)
    assert _is_number(results["meta"]["wall_s"])


def test_run_records_are_well_formed(results: dict[str, Any]) -> None:
    for run in results["runs"]:
        assert run["steps"] == results["meta"]["steps"][run["task"]] > 0
        assert all(_is_number(run[key]) for key in RUN_NUMBERS), run
        if run["task"] == "char-lm":
            assert run["heldout_accuracy"] is None and _is_number(run["heldout_perplexity"])
        else:
            assert run["heldout_perplexity"] is None and 0 <= run["heldout_accuracy"] <= 100
        assert run["trace_steps"][-1] == run["steps"]
        assert len(run["loss_ema_trace"]) == len(run["trace_steps"])
        assert all(_is_number(v) and v > 0 for v in run["loss_ema_trace"])


def test_summaries_are_well_formed(results: dict[str, Any]) -> None:
    summaries = results["summary"]
    assert [(s["task"], s["variant"]) for s in summaries] == [(t, v) for t in TASKS for v in VARIANTS]
    for s in summaries:
        assert all(_is_number(s[key]) for key in SUMMARY_NUMBERS), s
        if s["variant"] == "fp32":
            assert s["final_train_loss_delta_percent"] == 0.0


def test_markdown_is_printed_and_complete(cli: tuple[Path, str]) -> None:
    out, stdout = cli
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert text.strip() and text.strip() in stdout
    for task in TASKS:
        for variant in VARIANTS:
            assert re.search(rf"^\| {task} \| {variant} \|", text, re.MULTILINE), (task, variant)
    assert not re.search(r"\b(nan|inf)\b", text), "a non-finite number reached the table"


def test_png_is_written(cli: tuple[Path, str]) -> None:
    data = (cli[0] / "low-precision.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_render_reproduces_the_markdown(cli: tuple[Path, str], tmp_path: Path) -> None:
    out = cli[0]
    (tmp_path / "results.json").write_bytes((out / "results.json").read_bytes())
    command = [sys.executable, "-m", "bench.low_precision", "--render", "--out", str(tmp_path)]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == (out / "summary.md").read_text(encoding="utf-8")
    assert (tmp_path / "low-precision.png").read_bytes().startswith(PNG_SIGNATURE)
