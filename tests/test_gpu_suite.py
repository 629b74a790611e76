"""The one-command GPU suite: the dry run runs every stage on CPU; without a GPU the real one refuses in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from .conftest import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.py"


def test_bench_gpu_without_a_gpu_is_one_error_line_pointing_to_the_dry_run():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    result = subprocess.run([sys.executable, str(SUITE)], env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: make bench-gpu needs one NVIDIA GPU"), result.stderr
    assert "make bench-gpu-dry" in lines[0] and "Traceback" not in result.stderr


def test_dry_run_writes_every_figure_to_the_results_file_it_is_given(tmp_path):
    committed = (REPO / "benchmarks" / "RESULTS.md").read_text()
    results, figures = tmp_path / "RESULTS.md", tmp_path / "suite.json"
    env = {**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(SUITE), "--dry-run", "--results", str(results), "--json", str(figures)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == committed  # a dry run never reaches the real file

    text = results.read_text()
    assert "## GPU suite, dry run" in text and "make bench-gpu-dry" in text and "**Versions**: torch" in text
    for row in ("| tokens/s (real example tokens) |", "| peak memory (planner) |", "| MFU (6N) | n/a | n/a |"):
        assert row in text
    assert "| tokens/s >= 1.5x plain trl |" in text and "| MFU >= 40% | n/a (no GPU) | n/a |" in text
    assert "verification passed" in text

    report = json.loads(figures.read_text())
    sides = report["training"]["sides"]
    assert sides["toolkit"]["tokens_per_second"] > 0 and sides["baseline"]["tokens_per_second"] > 0
    # The plain script keeps peft's fp32 upcast of embeddings and lm_head (qlora-kit undoes it under bf16 compute; on
    # CPU both compute in float32, so the two plans agree there).
    baseline_plan = report["training"]["baseline_plan"]
    assert baseline_plan["parts"]["unquantized_weights"] == 4 * baseline_plan["params"]["unquantized"]
    assert baseline_plan["total_bytes"] >= report["training"]["plan"]["total_bytes"]
    assert [t["passed"] for t in report["targets"]][2] is None  # MFU is not judged without a GPU
    points = report["ladder"]["points"]
    assert {(p["switch"], p["length"]) for p in points} >= {("default", 64), ("default", 128)}
    for point in points:
        assert point["measured_step_bytes"] > 0 and math.isfinite(point["predicted_step_bytes"])
        assert f"| {point['switch']} | {point['length']:,} |" in text
    # What cannot run on CPU is named with pre-flight's own reason, not measured.
    skipped = report["ladder"]["skipped"]
    assert set(skipped) == {"offload=true", "activation_offloading=true", "use_liger_kernel=true"}
    assert all("GPU" in why for why in skipped.values())
    assert report["merge"]["passed"] is True and report["merge"]["max_abs_logit_diff"] < 1e-3
