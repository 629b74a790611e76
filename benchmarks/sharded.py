"""Sharded (FSDP2, optionally DeepSpeed ZeRO-3) on 2 CPU processes vs one process, same global batch.

    python benchmarks/sharded.py                                # the demo model and data, FSDP2 vs one process
    python benchmarks/sharded.py --deepspeed-python /path/to/venv-with-deepspeed/bin/python   # ZeRO-3 too

Each run is the user's own command, `qlora-kit train benchmarks/out/sharded/recipe.yaml [--accelerate-profile P]`:
one process with a batch of 2 x per-device, against 2 processes with the per-device batch each (same global batch,
so the same examples in each step). Runs are interleaved (single, fsdp[, zero3], then again) so machine load hits them
alike. Per run: the loss at every step, wall time of the whole command (start-up, loading, training, gathering and
publishing), the trainer's own training time, and the peak resident memory of every process of the job (polled every
50 ms with psutil: the `qlora-kit` launcher, accelerate's launcher and agent, each rank). The adapter of each sharded
run is compared with the single-process one (max abs difference over all LoRA tensors).

The 4-bit weights are stored in float32, the compute dtype on CPU (FSDP and ZeRO-3 shard them like any other
weight). DeepSpeed is not a dependency of qlora-kit: --deepspeed-python names the interpreter of an environment that
has it (and the project's packages), used for the ZeRO-3 runs only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "sharded"


def write_recipe(args: argparse.Namespace) -> Path:
    recipe = {
        "model": {"name_or_path": str(REPO / "models" / "demo-base")},
        "quantization": {"bnb_4bit_quant_storage": "float32"},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(REPO / "data" / "demo" / "train.jsonl")}], "max_length": 128},
        "training": {
            "max_steps": args.steps,
            "learning_rate": 2e-3,
            "logging_steps": 1,
            "packing": False,  # unpacked rows: the two processes split each global batch exactly
            "save_strategy": "steps",
            "save_steps": args.steps,
            "gradient_checkpointing": False,
            "report_to": "none",
        },
        "eval": {"num_samples": 0},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def watch(process: subprocess.Popen) -> dict[str, int]:
    """Peak RSS of every process of the job while it runs, keyed by its role."""
    import psutil

    peaks: dict[int, tuple[str, int]] = {}
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            job = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in job:
            try:
                rss = member.memory_info().rss
                role = peaks.get(member.pid, (None, 0))[0] or role_of(member, root)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            peaks[member.pid] = (role, max(rss, peaks.get(member.pid, (role, 0))[1]))
        time.sleep(0.05)
    by_role: dict[str, int] = {}
    for role, rss in peaks.values():  # helpers of one name (several ninja or sh) by their largest
        by_role[role] = max(rss, by_role.get(role, 0))
    return dict(sorted(by_role.items()))


def role_of(member, root) -> str:
    """The launcher (or, alone, the one training process), accelerate's launcher with torchrun's agent in it, a rank,
    or any other helper by its program name (DeepSpeed's op loader starts a few)."""
    if member.pid == root.pid:
        return "qlora-kit train"
    command = " ".join(member.cmdline())
    if "accelerate.commands.launch" in command:
        return "accelerate launch"
    rank = member.environ().get("RANK") if "qlora_kit" in command else None
    return f"rank {rank}" if rank is not None else member.name()


def run(name: str, python: str, recipe: Path, batch: int, profile: str | None) -> dict:
    run_dir = OUT / name
    for stale in (run_dir, run_dir.parent / f".{run_dir.name}.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    command = [python, "-m", "qlora_kit", "train", str(recipe), "--output-dir", str(run_dir)]
    command += [f"training.per_device_train_batch_size={batch}"] + (
        ["--accelerate-profile", profile] if profile else []
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = watch(process)
    stderr = process.communicate()[1].decode()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"{name} failed ({process.returncode}):\n{stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    state = json.loads(next(run_dir.glob("checkpoint-*/trainer_state.json")).read_text())
    return {
        "name": name,
        "command": " ".join(command[1:]),
        "losses": [entry["loss"] for entry in state["log_history"] if "loss" in entry],
        "wall_s": round(wall, 2),
        "train_runtime_s": round(metrics["train_runtime_s"], 2),
        "peak_rss_mib": {role: round(rss / 2**20, 1) for role, rss in peaks.items()},
        "parameter_bytes": metrics["launch"]["parameter_bytes"],
        "adapter": str(run_dir / "adapter" / "adapter_model.safetensors"),
    }


def max_abs_diff(a: str, b: str) -> float:
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys(), "the adapters hold different tensors"
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--deepspeed-python", help="an interpreter whose environment has deepspeed (ZeRO-3 runs)")
    args = parser.parse_args()
    recipe = write_recipe(args)
    plans = [("single", sys.executable, 2 * args.per_device_batch, None)]
    plans.append(("fsdp2", sys.executable, args.per_device_batch, "fsdp_qlora"))
    if args.deepspeed_python:
        plans.append(("zero3", args.deepspeed_python, args.per_device_batch, "zero3"))
    results = []
    for round_ in range(1, args.rounds + 1):
        for name, python, batch, profile in plans:
            result = run(f"{name}-{round_}", python, recipe, batch, profile)
            print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
            results.append(result)
    single = {r["name"].split("-")[1]: r for r in results if r["name"].startswith("single")}
    for result in results:
        reference = single[result["name"].split("-")[1]]
        result["adapter_max_abs_diff_vs_single"] = max_abs_diff(result["adapter"], reference["adapter"])
        result["loss_max_abs_diff_vs_single"] = max(
            abs(a - b) for a, b in zip(result["losses"], reference["losses"], strict=True)
        )
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: list[dict]) -> None:
    print(
        "\n| run | wall s | train s | loss step 1 → last | max loss diff vs single | adapter max abs diff | "
        "peak RSS per process (MiB) |"
    )
    print("|---|---:|---:|---|---:|---:|---|")
    for r in results:
        rss = ", ".join(f"{role} {mib:.0f}" for role, mib in r["peak_rss_mib"].items())
        print(
            f"| {r['name']} | {r['wall_s']:.1f} | {r['train_runtime_s']:.1f} | {r['losses'][0]:.4f} → "
            f"{r['losses'][-1]:.4f} | {r['loss_max_abs_diff_vs_single']:.2e} | "
            f"{r['adapter_max_abs_diff_vs_single']:.2e} | {rss} |"
        )
    print("\nloss per step:")
    for r in results:
        print(f"  {r['name']}: " + " ".join(f"{loss:.4f}" for loss in r["losses"]))


if __name__ == "__main__":
    main()
