"""Peak memory of one training step at growing sequence lengths, with and without each memory switch, beside the
planner's prediction for the same recipe.

    python benchmarks/long_context.py                      # CPU: the demo architecture with a 128k vocabulary
    python benchmarks/long_context.py --model arch:llama-3.1-8b --lengths 2048,4096,8192,16384   # a GPU

Each switch runs in its own process (or, with --one-process, all in one), which loads the 4-bit model once (qlora-kit's
loader and LoRA), trains one unrecorded warm-up step, then one step on one packed row of each length, shortest first,
through qlora-kit's trainer (pre-flight included). A point's memory is what the step adds to what the process held
before it:

    GPU  torch.cuda.max_memory_allocated() - memory_allocated() before the step (peak statistics reset first)
    CPU  peak resident set size (VmHWM, reset through /proc/self/clear_refs) - resident set size before the step;
         glibc is told to return large blocks to the system (MALLOC_MMAP_THRESHOLD_), so a freed step leaves no
         memory behind to hide the next one's

and the planner's figure for it is the part of its plan a step adds: gradients, optimizer states, activations and the
loss (the weights are already loaded). A switch whose step takes longer than --step-limit-s stops its ladder there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The demo base's shape (models/demo-base: 4 layers, hidden 192, 6 heads of 32, 2 KV heads) with Llama-3's 128,256-
# token vocabulary, so the loss weighs what it weighs on a real model.
DEMO_128K = (
    "arch:llama-3.1-8b,num_hidden_layers=4,hidden_size=192,intermediate_size=512,num_attention_heads=6,"
    "num_key_value_heads=2"
)
# name -> training overrides; the first is qlora-kit's default (non-reentrant checkpointing of every layer).
SWITCHES: dict[str, dict[str, Any]] = {
    "default": {},
    "activation_checkpointing=false": {"activation_checkpointing": False},
    "use_reentrant=true": {"activation_checkpointing_kwargs": {"use_reentrant": True}},
    "every_n_layers=2": {"activation_checkpointing_kwargs": {"every_n_layers": 2}},
    "selective=true": {"activation_checkpointing_kwargs": {"selective": True}},
    "offload=true": {"activation_checkpointing_kwargs": {"offload": True}},
    "activation_offloading=true": {"activation_offloading": True},
    "use_liger_kernel=true": {"use_liger_kernel": True},
}
STEP_PARTS = ("gradients", "optimizer_states", "activations", "logits")


# ---------------------------------------------------------------------------------------------------------------
# One switch, in its own process


def recipe_for(model: str, tokenizer: str, length: int, training: dict[str, Any], data: Path):
    from qlora_kit.recipe import validate

    raw = {
        "model": {"name_or_path": model, "tokenizer_name_or_path": tokenizer},
        "data": {"train": [{"path": str(data)}], "max_length": length, "cache": False},
        "training": {
            "per_device_train_batch_size": 1,
            "max_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "logging_steps": 1,
            "disable_tqdm": True,
            **training,
        },
    }
    return validate(raw, source=f"long-context recipe ({model})")


def one_row(length: int, vocab: int, seed: int = 0):
    """One training row of exactly ``length`` tokens, every one in the loss (so packing yields one full row)."""
    import datasets

    rng = random.Random(seed)
    ids = [rng.randrange(2, vocab) for _ in range(length)]
    return datasets.Dataset.from_dict({"input_ids": [ids], "labels": [ids]})


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Reset the peak statistics; return what the process holds now."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    return rss_bytes("VmRSS")


def peak_since_reset() -> int:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return rss_bytes("VmHWM")


def run_group(args: argparse.Namespace) -> None:
    """Child: load the model once, then for each switch of the group one step per length, shortest first; write the
    points to --json as they complete. A step that runs out of GPU memory ends that switch's ladder."""
    from qlora_kit import model as model_stage
    from qlora_kit import tokenizer as tokenizer_rules
    from qlora_kit.bench.shapes import materialize_architecture

    lengths = [int(n) for n in args.lengths.split(",")]
    names = args.child.split(",")
    with tempfile.TemporaryDirectory(prefix="long-context-") as scratch:
        data = Path(scratch) / "unused.jsonl"
        data.write_text('{"text": "x"}\n')
        first = recipe_for(args.model, args.tokenizer, lengths[0], SWITCHES[names[0]], data)
        built = materialize_architecture(first)
        model_path = str(built) if built else args.model
        tokenizer = tokenizer_rules.load_tokenizer(first)
        model = model_stage.attach_lora(model_stage.load_base_model(first, tokenizer), first)
        points: list[dict[str, Any]] = []
        step(model, tokenizer, first, lengths[0], Path(scratch))  # unrecorded: the process's one-time allocations
        for name in names:
            recipe = recipe_for(model_path, args.tokenizer, lengths[0], SWITCHES[name], data)
            for length in lengths:
                point = {"switch": name, "length": length, **step(model, tokenizer, recipe, length, Path(scratch))}
                points.append(point)
                Path(args.json).write_text(json.dumps(points, indent=2) + "\n")
                if point["measured_step_bytes"] is None or point["step_seconds"] > args.step_limit_s:
                    break


def step(model, tokenizer, recipe, length: int, scratch: Path) -> dict[str, Any]:
    """One training step on one packed row of ``length`` tokens through qlora-kit's trainer (pre-flight first), and
    the planner's figures for the same recipe."""
    import torch

    from qlora_kit import launch
    from qlora_kit.data.build import DataStats, PreparedData
    from qlora_kit.plan import plan_recipe
    from qlora_kit.train import make_trainer

    recipe.data.max_length = length
    resolved = launch.preflight(recipe)
    plan = plan_recipe(recipe, machine=resolved.machine)
    prepared = PreparedData(one_row(length, len(tokenizer)), None, [], DataStats())
    trainer = make_trainer(recipe, model, tokenizer, prepared, scratch / "out", resolved=resolved)
    before = reset_peak()
    started = time.perf_counter()
    try:
        trainer.train()
        measured = peak_since_reset() - before
    except torch.OutOfMemoryError:
        measured = None
    seconds = time.perf_counter() - started
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "measured_step_bytes": measured,
        "predicted_step_bytes": sum(plan.parts[name] for name in STEP_PARTS),
        "predicted_total_bytes": plan.total,
        "predicted_parts": {name: plan.parts[name] for name in STEP_PARTS},
        "before_bytes": before,
        "step_seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------------------------
# The ladder: every switch in its own process, then one table


def runs_here(name: str, model: str, tokenizer: str) -> str | None:
    """None when the switch can run on this machine, else pre-flight's own reason (one line)."""
    from qlora_kit import launch
    from qlora_kit.errors import UserError

    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "unused.jsonl"
        data.write_text('{"text": "x"}\n')
        try:
            launch.preflight(recipe_for(model, tokenizer, 512, SWITCHES[name], data))
        except UserError as exc:
            return str(exc).split(": ", 1)[-1]
    return None


def ladder(
    model: str,
    tokenizer: str,
    lengths: list[int],
    groups: list[list[str]],
    step_limit_s: float,
    show=print,
) -> dict[str, Any]:
    """Run every switch that runs here over ``lengths``, each group of switches in one process (one model load); return
    the points and the switches not measured, with why."""
    points: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    for group in groups:
        runnable = []
        for name in group:
            reason = runs_here(name, model, tokenizer)
            if reason is None:
                runnable.append(name)
            else:
                skipped[name] = reason
                show(f"{name}: not run here ({reason})")
        if not runnable:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "points.json"
            command = [sys.executable, __file__, "--child", ",".join(runnable), "--model", model]
            command += ["--tokenizer", tokenizer, "--lengths", ",".join(map(str, lengths)), "--json", str(out)]
            command += ["--step-limit-s", str(step_limit_s)]
            show(f"{', '.join(runnable)}: {', '.join(map(str, lengths))} tokens ...")
            result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
            got = json.loads(out.read_text()) if out.is_file() else []
        points += got
        for name in runnable:
            mine = [p for p in got if p["switch"] == name]
            if result.returncode != 0 and len(mine) < len(lengths):
                tail = " | ".join(result.stderr.strip().splitlines()[-3:])
                skipped[name] = f"failed after {len(mine)} point(s): {tail}"
            elif mine and len(mine) < len(lengths) and mine[-1]["measured_step_bytes"] is not None:
                skipped[name] = f"stopped after {mine[-1]['length']:,} tokens (a step took over {step_limit_s:.0f} s)"
    return {"points": points, "skipped": skipped}


def error(point: dict[str, Any]) -> float | None:
    """Planner error: (predicted - measured) / measured (None for a step that ran out of memory)."""
    if not point["measured_step_bytes"]:
        return None
    return (point["predicted_step_bytes"] - point["measured_step_bytes"]) / point["measured_step_bytes"]


def markdown(result: dict[str, Any]) -> str:
    """One table: a row per switch and length, measured beside predicted, and the planner's error."""
    mib = 2**20
    lines = [
        "| switch | tokens | measured step (MiB) | planner step (MiB) | planner error | planner total (MiB) "
        "| step (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        measured, off = p["measured_step_bytes"], error(p)
        shown = "out of memory" if measured is None else f"{measured / mib:,.0f}"
        lines.append(
            f"| {p['switch']} | {p['length']:,} | {shown} | "
            f"{p['predicted_step_bytes'] / mib:,.0f} | {'–' if off is None else f'{off:+.0%}'} | "
            f"{p['predicted_total_bytes'] / mib:,.0f} | {p['step_seconds']:.1f} |"
        )
    for name, why in result["skipped"].items():
        lines.append(f"| {name} | – | not measured: {why} | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_128K, help="arch:NAME[,key=value] or a model folder")
    parser.add_argument("--tokenizer", default=str(REPO / "models" / "demo-base"))
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--switches", default=",".join(SWITCHES), help=f"comma-separated, of {', '.join(SWITCHES)}")
    parser.add_argument(
        "--step-limit-s", type=float, default=600.0, help="stop a switch's ladder after a step this long"
    )
    parser.add_argument(
        "--one-process",
        dest="process_per_switch",
        action="store_false",
        help="run every switch in one process (one model load; each switch's recipe decides its checkpointing)",
    )
    parser.add_argument("--json", help="write the points here (and, with --child, the child's points)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # comma-separated switches run in one process
    args = parser.parse_args()
    if args.child:
        run_group(args)
        return
    lengths = [int(n) for n in args.lengths.split(",")]
    groups = [[name] for name in args.switches.split(",")] if args.process_per_switch else [args.switches.split(",")]
    result = ladder(args.model, args.tokenizer, lengths, groups, args.step_limit_s)
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
