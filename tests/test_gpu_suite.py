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

    # Stage 3: the packed layouts side by side; flash-attention's is named as left out without a GPU.
    layouts = report["layouts"]
    assert set(layouts["layouts"]) == {"sdpa", "one-row"} and layouts["left_out"] == {"flash-one-row": "no GPU"}
    assert all(figures["step_ms"] > 0 and figures["tokens_per_second"] > 0 for figures in layouts["layouts"].values())
    line = next(line for line in text.splitlines() if line.startswith("Packed layouts"))
    assert "sdpa, one packed row per batch slot" in line and "1.00x" in line and "left out (no GPU)" in line

    # Stage 5: benchmarks/peers.py on CPU with the two tools that need no install, its table in the section.
    beside = report["peers"]
    assert beside["device"] == "cpu" and beside["left_out"] == {} and set(beside["results"]) == {"qlora-kit", "trl"}
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("qlora-kit beside the peers"))
    header = [cell.strip() for cell in lines[start + 2].strip("|").split("|")]
    assert "peak GPU memory (MiB)" not in header  # no CUDA, no column
    rows = {row.strip("|").split("|")[0].strip(): row.strip("|").split("|") for row in lines[start + 4 : start + 6]}
    assert set(rows) == {"qlora-kit", "trl"}
    for tool, cells in rows.items():
        (run,) = beside["results"][tool]
        assert run["steps"] == 6 and run["four_bit_weights"] > 0 and math.isfinite(run["heldout_loss"])
        for column in ("trained tokens/s", "input tokens/s"):
            assert float(cells[header.index(column)].replace(",", "")) > 0, (tool, column, cells)
        assert run["input_tokens_per_s"] > 0 and run["trained_tokens_per_s"] > 0


def test_a_peer_that_cannot_be_installed_or_imported_is_left_out_with_its_reason(tmp_path, monkeypatch):
    """What stage 5 meets on a GPU machine with no route to PyPI: the peer is named with pip's last line, not run."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_suite
    import peers

    # pip with no index to reach, as on a machine without network; only the asked-for peer is attempted.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    cache = tmp_path / "peers-cache"
    times, failed = peers.install(cache, ["qlora-kit", "llamafactory", "trl"])
    assert times == {} and list(failed) == ["llamafactory"]
    assert failed["llamafactory"] == "install failed: ERROR: No matching distribution found for torch==2.9.1"
    assert not (cache / "llamafactory" / ".installed.json").exists() and not (cache / "axolotl").exists()

    # An environment whose training entry point does not import.
    (cache / "axolotl" / "bin").mkdir(parents=True)
    (cache / "axolotl" / "bin" / "python").symlink_to(sys.executable)  # this Python has no axolotl
    assert peers.import_error(cache, "axolotl") == "ModuleNotFoundError: No module named 'axolotl'"

    run = {"wall_s": 9.0, "first_step_s": 2.0, "step_ms": 30.0, "trained_tokens_per_s": 900.0}
    run |= {"input_tokens_per_s": 7000.0, "peak_rss_mib": 800.0, "final_train_loss": 1.5, "heldout_loss": 1.6}
    report = {"job": {"bf16": True, "optim": "paged_adamw_8bit", "packing": True}, "device": "cuda", "skip_steps": 5}
    report |= {"results": {"qlora-kit": [run]}, "peer_versions": {}}
    report["left_out"] = {**failed, "axolotl": "does not import: ModuleNotFoundError: No module named 'axolotl'"}
    text = "\n".join(gpu_suite.peers_lines(report, {"peer_steps": 100, "peer_rounds": 3}))
    assert "on cuda: bf16 4-bit compute dtype, paged_adamw_8bit for every tool" in text
    assert "| qlora-kit | 9.0 | 2.0 | 30 | 900 | 7,000 | 800 | 1.500 | 1.600 |" in text
    assert (
        "Left out: llamafactory: install failed: ERROR: No matching distribution found for torch==2.9.1; "
        "axolotl: does not import: ModuleNotFoundError: No module named 'axolotl'." in text
    )
