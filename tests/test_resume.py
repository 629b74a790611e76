"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM) after a checkpoint and resumed ends with the very same
adapter as a run that never stopped, on CPU in float32. Real subprocesses, real 4-bit model, real trainer steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.checkpoints import MARKER, SAVING_DIR, complete_checkpoints
from qlora_kit.cli import main

from .conftest import REPO, tiny_recipe

# 36 training rows in batches of 8 make 5 steps an epoch, so 8 steps cross an epoch boundary (a reshuffle) and
# checkpoints every 2 steps land both mid-epoch and in the second epoch. Dropout on, so RNG state matters too.
STEPS = [
    "training.max_steps=8",
    "training.save_steps=2",
    "training.save_strategy=steps",
    "training.save_total_limit=10",
    "lora.lora_dropout=0.1",
    "eval.num_samples=0",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def command(recipe: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlora_kit", "train", str(recipe), "--output-dir", str(run), *STEPS, *extra]


def run_cli(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, **kwargs
    )


def staging(run: Path) -> Path:
    return run.parent / f".{run.name}.partial"


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def start_and_signal(cmd: list[str], run: Path, signum: int, after_step: int) -> tuple[int, str]:
    """Start a training run, send it ``signum`` once checkpoint-``after_step`` is complete; return (status, stderr)."""
    process = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (staging(run) / f"checkpoint-{after_step}" / MARKER).is_file():
        assert process.poll() is None, f"run ended before checkpoint-{after_step}: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir, arithmetic_rows) -> Path:
    return tiny_recipe(tmp_path_factory.mktemp("resume"), tiny_model_dir, arithmetic_rows)


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    result = run_cli(*command(recipe, run))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def fake_interrupted_save(folder: Path, after: Path) -> Path:
    """What a kill in the middle of a save leaves: a half-written folder in .saving, and (from another tool, or a
    copy) a checkpoint-N folder without the marker that qlora-kit writes last. Returns the latter."""
    step = int(after.name.split("-")[1]) + 1
    half = shutil.copytree(after, folder / f"checkpoint-{step}")
    (half / MARKER).unlink()
    (half / "optimizer.pt").unlink()
    shutil.copytree(after, folder / SAVING_DIR / f"checkpoint-{step + 1}")
    return half


def assert_same_adapter(expected_run: Path, run: Path) -> None:
    expected, got = adapter(expected_run), adapter(run)
    assert expected.keys() == got.keys() and all(v.dtype == torch.float32 for v in got.values())
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs by {(expected[name] - got[name]).abs().max()}"


def losses(checkpoint: Path) -> list[float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_sigkill_then_resume_gives_the_same_adapter(recipe, uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    status, _ = start_and_signal(command(recipe, run), run, signal.SIGKILL, after_step=2)
    assert status == -signal.SIGKILL and not run.exists()
    saved = complete_checkpoints(staging(run))
    assert saved and saved[-1].name not in ("checkpoint-7", "checkpoint-8"), "killed too late to test resuming"

    # Without --resume the unfinished run's checkpoints are neither used nor thrown away.
    assert main(command(recipe, run)[3:]) == 2 and complete_checkpoints(staging(run)) == saved
    assert "add --resume to continue it" in capsys.readouterr().err
    half = fake_interrupted_save(staging(run), saved[-1])
    assert main([*command(recipe, run)[3:], "--resume", str(half)]) == 2
    assert "not a complete qlora-kit checkpoint" in capsys.readouterr().err

    resumed = run_cli(*command(recipe, run, "--resume"))  # the latest *complete* checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["launch"]["resumed_from"] == saved[-1].name
    assert_same_adapter(uninterrupted, run)
    # The loss history carries on where it stopped, identical to the uninterrupted run's step by step.
    assert losses(run / "checkpoint-8") == losses(uninterrupted / "checkpoint-8")
    assert not (run / SAVING_DIR).exists()


def test_sigterm_saves_a_checkpoint_and_exits_143(recipe, uninterrupted, tmp_path):
    run = tmp_path / "run"
    status, stderr = start_and_signal(command(recipe, run), run, signal.SIGTERM, after_step=2)
    assert status == 143, stderr[-3000:]
    last = complete_checkpoints(staging(run))[-1]
    step = int(last.name.split("-")[1])
    assert 2 < step < 8 and f"stopped by SIGTERM at step {step}" in stderr and "--resume" in stderr
    assert not run.exists() and not (staging(run) / SAVING_DIR).exists()

    resumed = run_cli(*command(recipe, run, "--resume", str(last)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(uninterrupted, run)


def test_resume_without_a_checkpoint_says_what_to_do(recipe, tmp_path, capsys):
    assert main(command(recipe, tmp_path / "run")[3:] + ["--resume"]) == 2
    error = capsys.readouterr().err
    assert "no complete checkpoint" in error and "without --resume" in error
    assert main(command(recipe, tmp_path / "run")[3:] + ["--resume", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
