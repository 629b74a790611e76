"""`bench train`: qlora-kit and a plain trl script, each in its own process, on the same data and settings."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.bench.measure import (
    SIDES,
    Meter,
    machine,
    matmul_params,
    measured_quantized_bytes,
    mfu,
    peak_memory,
    summarize,
)
from qlora_kit.bench.report import method_note
from qlora_kit.bench.shapes import materialize_architecture
from qlora_kit.errors import UserError
from qlora_kit.rundir import versions


def _bench_training(recipe, warmup: int, steps: int) -> dict[str, Any]:
    """Training fields both sides share: measured steps only, no checkpoints, no evaluation; every step's loss logged
    (the report's final loss is the last step's own)."""
    return {
        **recipe.training,
        "max_steps": warmup + steps,
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 1,
        "disable_tqdm": True,
        "eval_strategy": "no",
    }


def run_toolkit(recipe, warmup: int, steps: int, workdir: Path, started: float) -> dict[str, Any]:
    """qlora-kit's own path: its data pipeline, 4-bit loading and LoRA, and packing unless the recipe turns it off."""
    from qlora_kit import data as data_stage
    from qlora_kit import model as model_stage
    from qlora_kit.train import make_trainer

    if recipe.method != "sft":
        return run_toolkit_preference(recipe, warmup, steps, workdir, started)
    recipe.training = {"packing": True, **_bench_training(recipe, warmup, steps)}
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    prepared = dataclasses.replace(data_stage.build_datasets(recipe, tokenizer), eval=None)
    model = model_stage.attach_lora(model_stage.load_base_model(recipe, tokenizer), recipe)
    trainer = make_trainer(recipe, model, tokenizer, prepared, workdir)
    return _train_and_measure(trainer, model, recipe, warmup, started, packing_fill(trainer.train_dataset, recipe))


def run_toolkit_preference(recipe, warmup: int, steps: int, workdir: Path, started: float) -> dict[str, Any]:
    """qlora-kit's preference path as ``qlora-kit train`` runs it: its tokenized pairs, the policy model (fresh LoRA or
    ``model.adapter``), trl's trainer for the method with the reference inside the one model."""
    from qlora_kit import preference
    from qlora_kit.data import preference as pref_data
    from qlora_kit.resolve import resolve

    recipe.training = _bench_training(recipe, warmup, steps)
    resolved = resolve(recipe)
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    tokenizer_rules.check_pad_token(tokenizer)
    data = dataclasses.replace(pref_data.build(recipe, tokenizer), eval=None)
    config = preference.preference_config(recipe, workdir, False, resolved)
    model = preference.policy_model(recipe, tokenizer, resolved)
    trainer = preference.make_trainer(recipe, model, tokenizer, data, config, resolved)
    return _train_and_measure(trainer, model, recipe, warmup, started, None)


def run_baseline(recipe, warmup: int, steps: int, workdir: Path, started: float) -> dict[str, Any]:
    """What a user writes by hand (bench.plain): a 4-bit model, a peft LoraConfig, raw rows to trl's trainer for the
    method, trl's own defaults; the same batch, optimizer, schedule and checkpointing as the toolkit side."""
    from qlora_kit.bench import plain

    training = _bench_training(recipe, warmup, steps)
    if recipe.method == "sft":
        trainer = plain.sft_trainer(recipe, training, workdir)
    else:
        trainer = plain.preference_trainer(recipe, training, workdir)
    return _train_and_measure(trainer, trainer.model, recipe, warmup, started, None)


def packing_fill(dataset, recipe) -> float | None:
    """Mean packed row length over max_length: how full the packed rows are (None when rows are not packed)."""
    if dataset is None or "seq_lengths" not in dataset.column_names:
        return None
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return sum(lengths) / (len(lengths) * recipe.data.max_length)


def _train_and_measure(trainer, model, recipe, warmup: int, started: float, fill: float | None) -> dict[str, Any]:
    meter = Meter(started)
    meter.attach(trainer)
    trainer.train()
    result = summarize(meter, warmup)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result["final_loss"] = losses[-1] if losses else None
    result["method"] = recipe.method
    result["packing_fill"] = fill
    result["memory"] = peak_memory()
    result["quantized_weight_bytes"] = measured_quantized_bytes(model)
    params = matmul_params(model)
    result["matmul_params"] = params
    # 6N per token holds for an SFT step; a preference step adds reference and KL passes without gradients.
    result["mfu"] = mfu(result["tokens_per_second"], params) if recipe.method == "sft" else None
    result["attn_implementation"] = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return result


def run_side(side: str, recipe_path: str, overrides: list[str], warmup: int, steps: int, json_out: Path) -> None:
    """One side of ``bench train`` in this process; writes its measurements to ``json_out``."""
    import peft  # noqa: F401  (imported before the clock starts, like transformers and trl below)
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from transformers import set_seed

    from qlora_kit.recipe import load_recipe, training_args

    started = time.perf_counter()
    recipe = load_recipe(recipe_path, overrides)
    set_seed(training_args(recipe)["seed"])
    with tempfile.TemporaryDirectory(prefix=f"qlora-kit-bench-{side}-") as workdir:
        runner = run_toolkit if side == "toolkit" else run_baseline
        result = runner(recipe, warmup, steps, Path(workdir), started)
    result["side"] = side
    json_out.write_text(json.dumps(result, indent=2) + "\n")


def bench_train(
    recipe_path: str, overrides: list[str], warmup: int, steps: int, baseline: bool, progress=None
) -> dict[str, Any]:
    """Run the toolkit side (and the plain trl baseline) in child processes; return the combined report."""
    from qlora_kit.plan import plan_recipe
    from qlora_kit.recipe import load_recipe

    show = progress or (lambda message: None)
    recipe = load_recipe(recipe_path, overrides)
    if recipe.method != "sft":
        check_preference_inputs(recipe)
    built = materialize_architecture(recipe)
    if built is not None:
        overrides = [*overrides, f"model.name_or_path={built}"]
    prediction = plan_recipe(recipe)
    report: dict[str, Any] = {
        "recipe": str(recipe_path),
        "overrides": overrides,
        "model": recipe.model.name_or_path,
        "method": recipe.method,
        "tokens_note": method_note(recipe.method),  # what the token counts mean for a preference method (None: SFT)
        "machine": machine(),
        "versions": versions(),
        "sides": {},
    }
    for side in SIDES if baseline else SIDES[:1]:
        show(f"{side}: {warmup} warm-up + {steps} measured steps ...")
        report["sides"][side] = _child(side, recipe_path, overrides, warmup, steps)
    report["plan"] = prediction.as_dict()
    if baseline:
        report["ratios"] = ratios(report["sides"]["toolkit"], report["sides"]["baseline"])
    return report


def check_preference_inputs(recipe) -> None:
    """The starting adapter and every training row's format against the method, read before either side starts: a
    mistake is one error line, not a child process's failure minutes later."""
    from qlora_kit.data import preference as pref_data
    from qlora_kit.data.sources import BadRows
    from qlora_kit.preference import adapter_folder

    if recipe.model.adapter is not None:
        adapter_folder(recipe.model.adapter)
    pref_data.collect(recipe, BadRows(recipe.data.max_bad_rows), pref_data.PreferenceStats())


def _child(side: str, recipe_path: str, overrides: list[str], warmup: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qlora-kit-bench-") as tmp:
        out = Path(tmp) / f"{side}.json"
        command = [
            sys.executable,
            "-m",
            "qlora_kit",
            "bench",
            "train",
            recipe_path,
            *overrides,
            "--side",
            side,
            "--json",
            str(out),
            "--warmup-steps",
            str(warmup),
            "--steps",
            str(steps),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        if result.returncode == 2 and errors:
            raise UserError(f"{side} side: {errors[-1].removeprefix('error: ')}")
        if result.returncode != 0 or not out.is_file():
            tail = "\n".join(result.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"bench train --side {side} failed (exit {result.returncode}):\n{tail}")
        return json.loads(out.read_text())


def ratios(toolkit: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """toolkit / baseline for throughput, memory and time to first step (>1 is faster; <1 is less memory)."""

    def ratio(a, b):
        return a / b if a is not None and b else None

    memory_key = "cuda_peak_allocated_bytes" if "cuda_peak_allocated_bytes" in toolkit["memory"] else "peak_rss_bytes"
    return {
        "steps_per_second": ratio(toolkit["steps_per_second"], baseline["steps_per_second"]),
        "tokens_per_second": ratio(toolkit["tokens_per_second"], baseline["tokens_per_second"]),
        "loss_tokens_per_second": ratio(toolkit["loss_tokens_per_second"], baseline["loss_tokens_per_second"]),
        "step_time": ratio(toolkit["step_time_mean_s"], baseline["step_time_mean_s"]),
        "peak_memory": ratio(toolkit["memory"][memory_key], baseline["memory"][memory_key]),
        "time_to_first_step": ratio(toolkit["time_to_first_step_s"], baseline["time_to_first_step_s"]),
    }
