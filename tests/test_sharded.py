"""FSDP2-QLoRA for real on a machine without GPUs: the user's own command with the shipped fsdp_qlora profile starts
two CPU processes over gloo that shard the 4-bit base and the LoRA weights (torch's fully_shard), write sharded
checkpoints and gather one complete PEFT adapter. Checked against one process with the same global batch, after a
SIGKILL of the whole job and --resume, with plain peft, and through a verified merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.checkpoints import MARKER, complete_checkpoints
from qlora_kit.cli import main

from .conftest import REPO, tiny_recipe
from .test_merge import FAST
from .test_resume import losses, staging

# 36 training rows unpacked, a global batch of 4 (two processes x 2 examples, or one process x 4): 9 steps an epoch,
# so 6 steps never meet the short last batch, which the two processes would fill differently. Checkpoints every 2
# steps. The 4-bit weights are stored in float32, the compute dtype on CPU, so FSDP shards them like any other weight.
STEPS = [
    "training.packing=false",
    "training.max_steps=6",
    "training.save_steps=2",
    "training.save_strategy=steps",
    "training.save_total_limit=10",
    "quantization.bnb_4bit_quant_storage=float32",
    "eval.num_samples=1",
]
SHARDED = ["--accelerate-profile", "fsdp_qlora", "training.per_device_train_batch_size=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def command(recipe: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlora_kit", "train", str(recipe), "--output-dir", str(run), *STEPS, *extra]


def run_cli(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def kill_job_after(cmd: list[str], run: Path, step: int) -> None:
    """Start a sharded run and SIGKILL every process of it (launcher, agent, workers: what a crashed machine or an
    out-of-memory kill of the job leaves) once checkpoint-``step`` is complete."""
    import psutil

    process = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (staging(run) / f"checkpoint-{step}" / MARKER).is_file():
        assert process.poll() is None, f"run ended before checkpoint-{step}: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    job = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    for pid in job:  # torch's agent starts the workers in sessions of their own: each is killed by its id
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert not any(alive(pid) for pid in job)


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir, arithmetic_rows) -> Path:
    return tiny_recipe(tmp_path_factory.mktemp("sharded"), tiny_model_dir, arithmetic_rows)


@pytest.fixture(scope="module")
def sharded(recipe, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    assert run_cli(command(recipe, run, *SHARDED)).stdout.count("adapter: ") == 1  # only the main process reports
    return run


@pytest.fixture(scope="module")
def single(recipe, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    run_cli(command(recipe, run, "training.per_device_train_batch_size=4"))
    return run


def test_two_sharded_cpu_processes_match_one_process(sharded, single):
    import torch.distributed.checkpoint as dcp

    metrics = json.loads((sharded / "metrics.json").read_text())
    assert metrics["launch"]["mode"] == "fsdp" and metrics["launch"]["processes"] == 2 and metrics["steps"] == 6
    # The main process holds half of every parameter (4-bit packed weights and LoRA alike), not the whole model.
    held = metrics["launch"]["parameter_bytes"]
    assert 0.45 * held["whole"] <= held["main_process"] <= 0.55 * held["whole"]
    assert (
        json.loads((single / "metrics.json").read_text())["launch"]["parameter_bytes"]["main_process"]
        == (held["whole"])
    )
    # Checkpoints are sharded: one file per rank, each adapter tensor in two row blocks.
    model_dir = sharded / "checkpoint-6" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in model_dir.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    stored = dcp.FileSystemReader(str(model_dir)).read_metadata().state_dict_metadata
    assert len(stored) == 2 * 7 * 2 and all(len(entry.chunks) == 2 for entry in stored.values())
    # Same global batch, same losses and the same adapter as one process (float32 on CPU; only summation order
    # differs).
    torch.testing.assert_close(losses(sharded / "checkpoint-6"), losses(single / "checkpoint-6"), rtol=1e-5, atol=0)
    gathered, whole = adapter(sharded), adapter(single)
    assert gathered.keys() == whole.keys() and len(gathered) == 2 * 7 * 2  # complete: every layer, A and B
    for name in whole:
        torch.testing.assert_close(gathered[name], whole[name], rtol=0, atol=1e-5)


def test_the_gathered_adapter_loads_with_plain_peft(sharded, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = adapter(sharded)
    lora_b = [name for name in saved if "lora_B" in name]
    assert lora_b and all(saved[name].abs().max() > 1e-3 for name in lora_b)  # trained: B starts at zero
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sharded / "adapter")
    loaded = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert len(loaded) == len(saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name.replace(".weight", ".default.weight")], tensor, rtol=0, atol=0)


def test_sigkill_of_the_sharded_job_then_resume_equals_the_uninterrupted_run(recipe, sharded, tmp_path):
    run = tmp_path / "run"
    kill_job_after(command(recipe, run, *SHARDED), run, step=2)
    saved = complete_checkpoints(staging(run))
    assert not run.exists() and saved and saved[-1].name in ("checkpoint-2", "checkpoint-4")
    resumed = run_cli(command(recipe, run, *SHARDED, "--resume"))
    assert "resuming from" in resumed.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["launch"]["resumed_from"] == saved[-1].name
    assert losses(run / "checkpoint-6") == losses(sharded / "checkpoint-6")
    expected, got = adapter(sharded), adapter(run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs by {(expected[name] - got[name]).abs().max()}"


def test_merge_of_the_sharded_runs_adapter_verifies(sharded, tmp_path):
    output = tmp_path / "merged"
    assert main(["merge", str(sharded), "--output", str(output), *FAST]) == 0
    verification = json.loads((output / "merge_report.json").read_text())["verification"]
    assert verification["passed"] and verification["max_abs_logit_diff"] < 1e-4
    assert verification["generation_agreement"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3: the same command with the shipped zero3 profile, on DeepSpeed's CPU accelerator over gloo (it
# compiles its shared-memory communication op with the C++ compiler on first use, then loads it from torch's
# extension cache).

ZERO3 = ["--accelerate-profile", "zero3", "training.per_device_train_batch_size=2"]


@pytest.fixture(scope="module")
def zero3(recipe, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("zero3") / "run"
    assert run_cli(command(recipe, run, *ZERO3)).stdout.count("adapter: ") == 1
    return run


def test_zero3_on_two_cpu_processes_matches_one_process_and_its_adapter_loads(zero3, single, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    metrics = json.loads((zero3 / "metrics.json").read_text())
    assert metrics["launch"]["mode"] == "deepspeed" and metrics["launch"]["processes"] == 2 and metrics["steps"] == 6
    held = metrics["launch"]["parameter_bytes"]  # ZeRO-3 partitions every parameter: each rank keeps about half
    assert 0.45 * held["whole"] <= held["main_process"] <= 0.55 * held["whole"]
    torch.testing.assert_close(losses(zero3 / "checkpoint-6"), losses(single / "checkpoint-6"), rtol=1e-5, atol=0)
    gathered, whole = adapter(zero3), adapter(single)
    assert gathered.keys() == whole.keys() and len(gathered) == 2 * 7 * 2
    for name in whole:
        torch.testing.assert_close(gathered[name], whole[name], rtol=0, atol=5e-5)
    assert all(gathered[name].abs().max() > 1e-3 for name in gathered if "lora_B" in name)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), zero3 / "adapter")
    assert len([name for name, _ in model.named_parameters() if "lora_" in name]) == len(gathered)
