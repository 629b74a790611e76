"""Speed and memory measurements: training against a plain trl script, and generation with and without the adapter.

``bench train`` runs each side in its own process, so peak memory (CUDA peak, or the RSS high-water mark on CPU) is
that side's alone, and prints both sides and their ratio from the same invocation. Tokens are counted from the batches
the trainer actually computes the loss on:

    processed tokens  real tokens of the examples (attention_mask sum, or the non-pad tokens of packed rows)
    loss tokens       labels != -100 after the shift by one (what the loss is averaged over)
    padded tokens     input_ids.numel(): the positions the model computes, padding included

MFU uses the 6N convention (Kaplan et al. 2020; nanoGPT): 6 x N FLOPs per processed token, N = parameters that take
part in matmuls (every linear layer, lm_head included; the embedding lookup excluded), attention scores ignored. For
QLoRA this is also close to the FLOPs really executed: the frozen base needs no weight gradients (2N forward + 2N
input-gradient), and gradient checkpointing recomputes the forward (+2N).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.data.collate import real_token_count
from qlora_kit.errors import UserError
from qlora_kit.plan import ARCH_PREFIX, arch_config

SIDES = ("toolkit", "baseline")
# Dense bf16 tensor-core peaks (no sparsity), by the device name torch reports, for MFU.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "L4": 121e12,
    "RTX 4090": 165.2e12,
    "A10G": 70e12,
}


# ---------------------------------------------------------------------------------------------------------------
# Random-weight models from an architecture config


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit")) / "random-models"


def materialize_architecture(recipe) -> Path | None:
    """For ``model.name_or_path: arch:NAME[,key=value]``, save a random-weight model of that shape and point the
    recipe at it (cached by config and tokenizer, so both benchmark sides and later runs reuse it).

    The tokenizer comes from ``model.tokenizer_name_or_path``; the model keeps the architecture's own vocabulary size
    (a larger embedding than the tokenizer needs costs the same memory as the real model's).
    """
    spec = recipe.model.name_or_path
    if not spec.startswith(ARCH_PREFIX):
        return None
    if not recipe.model.tokenizer_name_or_path:
        raise UserError(
            f"model.tokenizer_name_or_path: {spec} has random weights and no tokenizer: name one "
            "(any local tokenizer folder, e.g. models/demo-base)"
        )
    config = arch_config(spec)
    key = hashlib.sha256(
        json.dumps([config, recipe.model.tokenizer_name_or_path], sort_keys=True).encode()
    ).hexdigest()
    target = cache_root() / f"{spec.removeprefix(ARCH_PREFIX).split(',')[0]}-{key[:12]}"
    if not (target / "config.json").is_file():
        _save_random_model(config, recipe.model.tokenizer_name_or_path, target)
    recipe.model.name_or_path = str(target)
    return target


def _save_random_model(config: dict[str, Any], tokenizer_path: str, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    if len(tokenizer) > hf_config.vocab_size:
        hf_config.vocab_size = len(tokenizer)
    # The random model is used with this tokenizer, so its special tokens are the ones that matter.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(hf_config, name, getattr(tokenizer, name))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)


# ---------------------------------------------------------------------------------------------------------------
# Measuring one side


class Meter:
    """Per-step wall time and token counts, recorded from the batches the loss is computed on."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.steps: list[dict[str, float]] = []
        self.pending = {"processed": 0, "loss": 0, "padded": 0}
        self.last = started

    def count(self, inputs: dict[str, Any], pad_token_id: int | None) -> None:
        self.pending["padded"] += inputs["input_ids"].numel()
        self.pending["processed"] += real_token_count(inputs, pad_token_id)
        self.pending["loss"] += int((inputs["labels"][..., 1:] != -100).sum())

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepTimes(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                _sync()
                meter.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _sync()
                now = time.perf_counter()
                meter.steps.append({"seconds": now - meter.last, "since_start": now - meter.started, **meter.pending})
                meter.pending = {"processed": 0, "loss": 0, "padded": 0}
                meter.last = now

        return StepTimes()

    def attach(self, trainer) -> None:
        compute_loss = trainer.compute_loss

        pad_token_id = trainer.processing_class.pad_token_id

        def counting(model, inputs, *args, **kwargs):
            if model.training:
                self.count(inputs, pad_token_id)
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counting
        trainer.add_callback(self.callback())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(meter: Meter, warmup: int) -> dict[str, Any]:
    """Throughput over the steps after warm-up; wall time to the end of the first optimizer step."""
    measured = meter.steps[warmup:]
    if not measured:
        raise UserError(f"--warmup-steps {warmup} leaves no step to measure: raise --steps")
    seconds = sum(s["seconds"] for s in measured)
    totals = {k: sum(s[k] for s in measured) for k in ("processed", "loss", "padded")}
    durations = sorted(s["seconds"] for s in measured)
    return {
        "measured_steps": len(measured),
        "warmup_steps": warmup,
        "seconds": seconds,
        "step_time_mean_s": seconds / len(measured),
        "step_time_median_s": durations[len(durations) // 2],
        "tokens_per_second": totals["processed"] / seconds,
        "loss_tokens_per_second": totals["loss"] / seconds,
        "padded_tokens_per_second": totals["padded"] / seconds,
        "tokens": totals,
        "padding_efficiency": totals["processed"] / max(totals["padded"], 1),
        "time_to_first_step_s": meter.steps[0]["since_start"],
    }


def peak_memory() -> dict[str, int]:
    if torch.cuda.is_available():
        return {
            "cuda_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "cuda_peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
        }
    return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def matmul_params(model) -> int:
    """Parameters of every linear layer (4-bit ones counted by their logical shape), lm_head included."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features
    return total


def mfu(tokens_per_second: float, params: int) -> float | None:
    """6N FLOPs per token over the GPU's dense bf16 peak; None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return 6 * params * tokens_per_second / peak if peak else None


def measured_quantized_bytes(model) -> int:
    """Bytes really held by 4-bit weights: packed codes plus every quantization-constant tensor, shared ones once."""
    import bitsandbytes as bnb

    storages: dict[int, int] = {}

    def add(tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            add(module.weight.data)
            for tensor in (state.absmax, state.code, state.offset):
                add(tensor)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
    return sum(storages.values())


def _bench_training(recipe, warmup: int, steps: int) -> dict[str, Any]:
    """Training fields both sides share: measured steps only, no checkpoints, no logs, no evaluation."""
    return {
        **recipe.training,
        "max_steps": warmup + steps,
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": warmup + steps,
        "disable_tqdm": True,
        "eval_strategy": "no",
    }


def run_toolkit(recipe, warmup: int, steps: int, workdir: Path, started: float) -> dict[str, Any]:
    """qlora-kit's own path: its data pipeline, 4-bit loading and LoRA, and packing unless the recipe turns it off."""
    from qlora_kit import data as data_stage
    from qlora_kit import model as model_stage
    from qlora_kit.train import make_trainer

    recipe.training = {"packing": True, **_bench_training(recipe, warmup, steps)}
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    prepared = dataclasses.replace(data_stage.build_datasets(recipe, tokenizer), eval=None)
    model = model_stage.attach_lora(model_stage.load_base_model(recipe, tokenizer), recipe)
    trainer = make_trainer(recipe, model, tokenizer, prepared, workdir)
    return _train_and_measure(trainer, model, warmup, started, packing_fill(trainer.train_dataset, recipe))


def run_baseline(recipe, warmup: int, steps: int, workdir: Path, started: float) -> dict[str, Any]:
    """What a user writes by hand: a 4-bit model, a peft LoraConfig, raw rows to SFTTrainer, trl's own defaults."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from qlora_kit import model as model_stage
    from qlora_kit.recipe import training_args

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.tokenizer_name_or_path or recipe.model.name_or_path)
    if tokenizer.chat_template is None:
        tokenizer_rules.set_chat_template(tokenizer, recipe.model.chat_template)
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.name_or_path,
        quantization_config=model_stage.quantization_config(recipe),
        dtype=model_stage.compute_dtype(recipe),
        device_map=model_stage.device_map(recipe),
    )
    lora = recipe.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    # The same batch, optimizer, schedule and checkpointing as the toolkit side; trl's defaults for everything else.
    shared = {**training_args(recipe), **_bench_training(recipe, warmup, steps)}
    args = {k: v for k, v in shared.items() if k not in ("packing", "padding_free", "gradient_checkpointing_kwargs")}
    dtype = model_stage.compute_dtype(recipe)
    config = SFTConfig(
        output_dir=str(workdir),
        max_length=recipe.data.max_length,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **{k: v for k, v in args.items() if k not in ("bf16", "fp16")},
    )
    rows = datasets.Dataset.from_list(raw_rows(recipe))
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=peft_config
    )
    return _train_and_measure(trainer, trainer.model, warmup, started, None)


def raw_rows(recipe) -> list[dict[str, Any]]:
    """The training rows as the files hold them, with only the columns of their format (trl does the rest)."""
    from qlora_kit import data as data_stage

    columns = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
    rows = []
    for index, source in enumerate(recipe.data.train):
        for row in data_stage.read_formatted(source, f"data.train.{index}"):
            rows.append({c: row.data[c] for c in columns[row.fmt]})
    return rows


def packing_fill(dataset, recipe) -> float | None:
    """Mean packed row length over max_length: how full the packed rows are (None when rows are not packed)."""
    if dataset is None or "seq_lengths" not in dataset.column_names:
        return None
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return sum(lengths) / (len(lengths) * recipe.data.max_length)


def _train_and_measure(trainer, model, warmup: int, started: float, fill: float | None) -> dict[str, Any]:
    meter = Meter(started)
    meter.attach(trainer)
    trainer.train()
    result = summarize(meter, warmup)
    result["packing_fill"] = fill
    result["memory"] = peak_memory()
    result["quantized_weight_bytes"] = measured_quantized_bytes(model)
    params = matmul_params(model)
    result["matmul_params"] = params
    result["mfu"] = mfu(result["tokens_per_second"], params)
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


# ---------------------------------------------------------------------------------------------------------------
# bench train: both sides, combined


def bench_train(
    recipe_path: str, overrides: list[str], warmup: int, steps: int, baseline: bool, progress=None
) -> dict[str, Any]:
    """Run the toolkit side (and the plain trl baseline) in child processes; return the combined report."""
    from qlora_kit.plan import plan_recipe
    from qlora_kit.recipe import load_recipe

    show = progress or (lambda message: None)
    recipe = load_recipe(recipe_path, overrides)
    built = materialize_architecture(recipe)
    if built is not None:
        overrides = [*overrides, f"model.name_or_path={built}"]
    prediction = plan_recipe(recipe, on_gpu=torch.cuda.is_available())
    report: dict[str, Any] = {
        "recipe": str(recipe_path),
        "overrides": overrides,
        "model": recipe.model.name_or_path,
        "machine": machine(),
        "versions": _versions(),
        "sides": {},
    }
    for side in SIDES if baseline else SIDES[:1]:
        show(f"{side}: {warmup} warm-up + {steps} measured steps ...")
        report["sides"][side] = _child(side, recipe_path, overrides, warmup, steps)
    report["plan"] = prediction.as_dict()
    if baseline:
        report["ratios"] = ratios(report["sides"]["toolkit"], report["sides"]["baseline"])
    return report


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
        "tokens_per_second": ratio(toolkit["tokens_per_second"], baseline["tokens_per_second"]),
        "loss_tokens_per_second": ratio(toolkit["loss_tokens_per_second"], baseline["loss_tokens_per_second"]),
        "step_time": ratio(toolkit["step_time_mean_s"], baseline["step_time_mean_s"]),
        "peak_memory": ratio(toolkit["memory"][memory_key], baseline["memory"][memory_key]),
        "time_to_first_step": ratio(toolkit["time_to_first_step_s"], baseline["time_to_first_step_s"]),
    }


def machine() -> dict[str, Any]:
    import platform

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _versions() -> dict[str, str]:
    from qlora_kit.train import versions

    return versions()


# ---------------------------------------------------------------------------------------------------------------
# bench generate


PROMPT_TEXT = "Explain, step by step and in plain words, how a model learns from examples during fine-tuning. "


def generation_models(path: Path):
    """(tokenizer, compute dtype, [(name, model, context factory)]) for a run directory or a model folder."""
    from contextlib import nullcontext

    from peft import PeftModel

    from qlora_kit import model as model_stage
    from qlora_kit.recipe import load_yaml, validate

    if (path / "recipe.yaml").is_file() and (path / "adapter").is_dir():
        recipe = validate(load_yaml(path / "recipe.yaml"), source=str(path / "recipe.yaml"))
        recipe.model.tokenizer_name_or_path = str(path / "adapter")
    elif (path / "config.json").is_file():
        # A model folder alone: the recipe defaults (4-bit NF4, compute dtype by machine) apply; no data is read.
        recipe = validate({"model": {"name_or_path": str(path)}, "data": {"train": [{"path": str(path)}]}})
    else:
        raise UserError(f"{path}: not a run directory (recipe.yaml + adapter/) nor a model folder (config.json)")
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    base = model_stage.load_base_model(recipe, tokenizer)
    variants = []
    if (path / "adapter").is_dir():
        adapted = PeftModel.from_pretrained(base, str(path / "adapter"))
        variants += [("base", adapted, adapted.disable_adapter), ("adapter", adapted, nullcontext)]
    else:
        variants.append(("base", base, nullcontext))
    if (path / "merged" / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(
            path / "merged", dtype=model_stage.compute_dtype(recipe), device_map=model_stage.device_map(recipe)
        )
        variants.append(("merged", merged, nullcontext))
    return tokenizer, model_stage.compute_dtype(recipe), variants


@torch.no_grad()
def time_generation(model, tokenizer, batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Greedy decoding of exactly ``new_tokens`` tokens for ``batch`` identical-length prompts; best of ``repeats``."""
    ids = tokenizer(PROMPT_TEXT * (prompt_tokens // 8 + 1), add_special_tokens=False)["input_ids"][:prompt_tokens]
    device = next(model.parameters()).device
    inputs = torch.tensor([ids] * batch, device=device)
    mask = torch.ones_like(inputs)

    def run(count: int) -> float:
        _sync()
        start = time.perf_counter()
        model.generate(
            input_ids=inputs,
            attention_mask=mask,
            max_new_tokens=count,
            min_new_tokens=count,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        _sync()
        return time.perf_counter() - start

    model.eval()
    run(2)  # warm-up: kernels, caches, lazy initialisation
    first = min(run(1) for _ in range(repeats))
    total = min(run(new_tokens) for _ in range(repeats))
    per_token = (total - first) / max(new_tokens - 1, 1)
    return {
        "batch_size": batch,
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "time_to_first_token_s": first,
        "per_token_latency_s": per_token,
        "total_s": total,
        "tokens_per_second": batch * new_tokens / total,
    }


def bench_generate(
    path: str | Path, batch_sizes: list[int], prompt_tokens: int, new_tokens: int, repeats: int = 2, progress=None
) -> dict[str, Any]:
    show = progress or (lambda message: None)
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run directory or a model folder")
    tokenizer, dtype, variants = generation_models(path)
    rows = []
    for name, model, context in variants:
        for batch in batch_sizes:
            show(f"{name}: batch {batch} ...")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with context():
                row = {"model": name, **time_generation(model, tokenizer, batch, prompt_tokens, new_tokens, repeats)}
            row.update(peak_memory())
            rows.append(row)
    return {
        "path": str(path),
        "dtype": str(dtype).removeprefix("torch."),
        "machine": machine(),
        "versions": _versions(),
        "results": rows,
    }


# ---------------------------------------------------------------------------------------------------------------
# Reports


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f} MiB"


def _num(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def train_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """(metric, toolkit, baseline, ratio) rows for the terminal and the Markdown table."""
    sides = report["sides"]
    names = [s for s in SIDES if s in sides]
    ratio = report.get("ratios", {})
    memory_keys = [k for k in sides["toolkit"]["memory"]]
    rows = [
        ("tokens/s (processed)", "tokens_per_second", "{:,.1f}", "tokens_per_second"),
        ("tokens/s (in the loss)", "loss_tokens_per_second", "{:,.1f}", "loss_tokens_per_second"),
        ("tokens/s (padded positions)", "padded_tokens_per_second", "{:,.1f}", None),
        ("step time, mean (s)", "step_time_mean_s", "{:.3f}", "step_time"),
        ("time to first step (s)", "time_to_first_step_s", "{:.1f}", "time_to_first_step"),
        ("padding efficiency", "padding_efficiency", "{:.1%}", None),
        ("packing fill", "packing_fill", "{:.1%}", None),
        ("MFU (6N)", "mfu", "{:.1%}", None),
    ]
    table = [
        (label, *(_num(sides[n].get(key), fmt) for n in names), *([_num(ratio.get(rkey), "{:.2f}x")] if ratio else []))
        for label, key, fmt, rkey in rows
    ]
    for key in memory_keys:
        label = key.removesuffix("_bytes").replace("_", " ")
        table.append(
            (
                label,
                *(_mib(sides[n]["memory"][key]) for n in names),
                *(
                    [_num(ratio.get("peak_memory"), "{:.2f}x")]
                    if ratio and key == memory_keys[0]
                    else (["–"] if ratio else [])
                ),
            )
        )
    plan = report["plan"]
    table.append(("predicted peak (planner)", _mib(plan["total_bytes"]), *(["–"] * (len(names) - 1 + bool(ratio)))))
    table.append(
        (
            "4-bit weights: measured / planned",
            f"{_mib(sides['toolkit']['quantized_weight_bytes'])} / {_mib(plan['parts']['quantized_weights'])}",
            *(["–"] * (len(names) - 1 + bool(ratio))),
        )
    )
    return table


def train_markdown(report: dict[str, Any]) -> str:
    header = ["metric", *[s for s in SIDES if s in report["sides"]], *(["ratio"] if "ratios" in report else [])]
    lines = [
        f"# bench train: {report['recipe']}",
        "",
        f"machine: {_machine_line(report['machine'])}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in train_rows(report)]
    return "\n".join(lines) + "\n"


def generate_markdown(report: dict[str, Any]) -> str:
    header = "| model | batch | time to first token (s) | per-token latency (ms) | tokens/s | peak memory |"
    lines = [
        f"# bench generate: {report['path']}",
        "",
        f"machine: {_machine_line(report['machine'])}; dtype {report['dtype']}",
        "",
        header,
        "|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        memory = row.get("cuda_peak_allocated_bytes", row.get("peak_rss_bytes"))
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {row['time_to_first_token_s']:.3f} | "
            f"{row['per_token_latency_s'] * 1000:.1f} | {row['tokens_per_second']:,.1f} | {_mib(memory)} |"
        )
    return "\n".join(lines) + "\n"


def _machine_line(info: dict[str, Any]) -> str:
    if "gpu" in info:
        return f"{info['gpu']} ({info['gpu_memory_bytes'] / 2**30:.0f} GiB)"
    return f"{info['cpus']}-core CPU ({info['cpu']}), {info['platform']}"


def write_report(report: dict[str, Any], markdown: str, output_dir: Path, force: bool) -> None:
    """bench.json and bench.md, written to a staging folder and renamed into place."""
    from qlora_kit.train import check_run_dir, publish, staging_dir_for

    check_run_dir(output_dir, force)
    staging = staging_dir_for(output_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (staging / "bench.md").write_text(markdown)
    publish(staging, output_dir)
