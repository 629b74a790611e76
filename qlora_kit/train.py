"""Training: the recipe's 4-bit base + LoRA trained by trl's SFTTrainer, into a run directory written atomically.

The run is built in a hidden staging folder beside the target and renamed into place only once the adapter, metrics
and plots are all written, so a run directory that exists is always complete.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit import data as data_stage
from qlora_kit import model as model_stage
from qlora_kit.errors import UserError
from qlora_kit.evaluate import compare_base_and_tuned
from qlora_kit.recipe import Recipe, resolved_dict, to_yaml, training_args

VERSIONED_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    model: Any = None  # the trained PeftModel, for callers in the same process


# ---------------------------------------------------------------------------------------------------------------
# Run directory


def staging_dir_for(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.partial"


def check_run_dir(run_dir: Path, force: bool) -> None:
    if run_dir.exists() and not force:
        raise UserError(f"output directory {run_dir} already exists: pass --force to replace it, or set --output-dir")


def publish(staging: Path, run_dir: Path) -> None:
    """Move a finished run into place; an old run (only with --force) is removed after the new one is in."""
    trash = run_dir.parent / f".{run_dir.name}.old"
    if trash.exists():
        shutil.rmtree(trash)
    if run_dir.exists():
        run_dir.rename(trash)
    staging.rename(run_dir)
    if trash.exists():
        shutil.rmtree(trash)


# ---------------------------------------------------------------------------------------------------------------
# Trainer


def sft_config(recipe: Recipe, output_dir: Path, has_eval: bool):
    """trl's SFTConfig from the recipe; precision follows the compute dtype, never a silent fp32 on GPU or bf16 on CPU."""
    from trl import SFTConfig

    args = training_args(recipe)
    dtype = model_stage.compute_dtype(recipe)
    args.setdefault("bf16", dtype == torch.bfloat16)
    args.setdefault("fp16", dtype == torch.float16)
    if not has_eval:
        args["eval_strategy"] = "no"
    return SFTConfig(output_dir=str(output_dir), max_length=recipe.data.max_length, **args)


def _progress_callback():
    from transformers.trainer_callback import ProgressCallback

    class LossLineProgress(ProgressCallback):
        """The usual progress bar, with one short line per log instead of a raw dict."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not (state.is_world_process_zero and self.training_bar is not None and logs):
                return
            if "loss" in logs:
                line = f"step {state.global_step:>5}/{state.max_steps}  loss {logs['loss']:.4f}"
                line += f"  lr {logs.get('learning_rate', 0):.2e}  grad-norm {logs.get('grad_norm', 0):.3f}"
            elif "eval_loss" in logs:
                line = f"step {state.global_step:>5}/{state.max_steps}  eval loss {logs['eval_loss']:.4f}"
            else:
                return
            self.training_bar.write(line)

    return LossLineProgress


def keep_adapter_dtype(model, adapter_weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Undo SFTTrainer's cast of LoRA weights to bf16 on a 4-bit model unless the compute dtype is bf16.

    The cast follows the QLoRA paper for bf16 compute; with float32 compute (CPU) it would silently round the adapter
    and run its matmuls in bf16, so the saved adapter would not reproduce the float32 model that was evaluated.
    """
    if dtype == torch.bfloat16:
        return
    for name, param in model.named_parameters():
        original = adapter_weights.get(name)
        if original is not None and param.dtype != original.dtype:
            param.data = original


def make_trainer(recipe: Recipe, model, tokenizer, prepared: data_stage.PreparedData, output_dir: Path):
    from transformers.trainer_callback import ProgressCallback
    from trl import SFTTrainer

    class TokenCountingTrainer(SFTTrainer):
        """Counts the tokens that actually enter the loss (labels shifted by one, -100 excluded)."""

        loss_tokens = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.model.training:
                TokenCountingTrainer.loss_tokens += int((inputs["labels"][:, 1:] != data_stage.IGNORE_INDEX).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    config = sft_config(recipe, output_dir, prepared.eval is not None)
    adapter_weights = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
    trainer = TokenCountingTrainer(
        model=model,
        args=config,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval if config.eval_strategy != "no" else None,
        processing_class=tokenizer,
    )
    keep_adapter_dtype(model, adapter_weights, model_stage.compute_dtype(recipe))
    if not config.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_progress_callback())
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# Metrics and plots


def peak_memory_bytes() -> int:
    """CUDA peak allocated on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports kilobytes


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in VERSIONED_PACKAGES}


def training_metrics(trainer, runtime_s: float, loss_tokens: int) -> dict[str, Any]:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    world = max(trainer.args.world_size, 1)
    tokens = loss_tokens * world  # every rank sees its own share of the global batch
    return {
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "train_tokens": tokens,
        "train_runtime_s": runtime_s,
        "tokens_per_second": tokens / runtime_s if runtime_s > 0 else 0.0,
        "peak_memory_bytes": peak_memory_bytes(),
        "versions": versions(),
    }


def plot_loss(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (trained tokens)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The stage


def train(recipe: Recipe, run_dir: Path, force: bool = False, progress=None) -> RunResult:
    """Fine-tune the recipe's model and write a complete run directory at ``run_dir``."""
    from transformers import set_seed

    show = progress or (lambda *args, **kwargs: None)
    check_run_dir(run_dir, force)
    staging = staging_dir_for(run_dir)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    set_seed(training_args(recipe)["seed"])

    tokenizer = model_stage.load_tokenizer(recipe)
    prepared = data_stage.build_datasets(recipe, tokenizer)
    show("data", prepared.stats.as_dict())
    base = model_stage.load_base_model(recipe, tokenizer)
    model = model_stage.attach_lora(base, recipe)
    trainable, total = model.get_nb_trainable_parameters()
    show("model", {"trainable": trainable, "total": total, "dtype": str(model_stage.compute_dtype(recipe))})

    trainer = make_trainer(recipe, model, tokenizer, prepared, staging)
    if recipe.eval.callback_steps and prepared.eval_rows:
        from qlora_kit.evaluate.callback import generation_eval_callback

        trainer.add_callback(generation_eval_callback(trainer, tokenizer, prepared.eval_rows, recipe))
    started = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - started
    metrics = training_metrics(trainer, runtime, type(trainer).loss_tokens)
    metrics["data"] = prepared.stats.as_dict()

    if trainer.is_world_process_zero():
        metrics.update(_compare(model, tokenizer, prepared, recipe))
        _write_outputs(trainer, tokenizer, recipe, staging, metrics)
        publish(staging, run_dir)
    show("done", {"run_dir": str(run_dir), **metrics})
    return RunResult(run_dir=run_dir, metrics=metrics, model=model)


def _compare(model, tokenizer, prepared, recipe: Recipe) -> dict[str, Any]:
    if prepared.eval is None and not prepared.eval_rows:
        return {}
    pairs = data_stage.eval_prompts(prepared.eval_rows, tokenizer, recipe.eval.num_samples)
    return {"comparison": compare_base_and_tuned(
        model, tokenizer, prepared.eval, pairs, recipe.eval.max_examples, recipe.eval.max_new_tokens
    )}


def _write_outputs(trainer, tokenizer, recipe: Recipe, staging: Path, metrics: dict[str, Any]) -> None:
    adapter_dir = staging / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    # training_args.bin is a pickle of every argument; the resolved recipe.yaml already records them, redacted.
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    resolved = resolved_dict(recipe)
    # Record what "auto" became on this machine, so the run can be reproduced elsewhere.
    resolved["quantization"]["bnb_4bit_compute_dtype"] = str(model_stage.compute_dtype(recipe)).removeprefix("torch.")
    (staging / "recipe.yaml").write_text(to_yaml(resolved))
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss(trainer.state.log_history, staging / "loss_curve.png")
