"""Training: the recipe's 4-bit base + LoRA trained by trl's SFTTrainer, into a run directory written atomically.

The run is built in a hidden staging folder beside the target and renamed into place only once the adapter, metrics
and plots are all written, so a run directory that exists is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import SFTTrainer

from qlora_kit import checkpoints, launch, rundir, tracking
from qlora_kit import data as data_stage
from qlora_kit import model as model_stage
from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.data import cache as data_cache
from qlora_kit.data.collate import PackedRowsCollator, real_token_count
from qlora_kit.errors import TrainingStopped, UserError
from qlora_kit.evaluate import compare_base_and_tuned
from qlora_kit.recipe import (
    Recipe,
    culprit_key,
    is_secret_key,
    resolved_dict,
    to_yaml,
    training_args,
)
from qlora_kit.resolve import Launch, Resolved, packed_layout, resolve


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    model: Any = None  # the trained PeftModel, for callers in the same process


# ---------------------------------------------------------------------------------------------------------------
# Run directory


def input_paths(recipe: Recipe) -> dict[str, str | None]:
    """Everything on this machine the training command reads, by the recipe key that names it."""
    from qlora_kit.data.cache import cache_root

    paths: dict[str, str | None] = {
        "model.name_or_path": recipe.model.name_or_path,
        "model.tokenizer_name_or_path": recipe.model.tokenizer_name_or_path,
        "model.chat_template": recipe.model.chat_template,
        "data.eval.path": recipe.data.eval.path if recipe.data.eval else None,
        "data.cache_dir": str(cache_root(recipe.data)) if recipe.data.cache else None,
    }
    for index, source in enumerate(recipe.data.train):
        for number, path in enumerate(rundir.local_paths([source.path])):
            paths[f"data.train.{index}.path" + (f" ({path.name})" if number else "")] = str(path)
    return {key: value for key, value in paths.items() if value and Path(value).expanduser().exists()}


def prepare_staging(run_dir: Path, force: bool, resume: bool | str | None) -> Path | None:
    """Make the staging folder ready and return the checkpoint to resume from, if any.

    The staging folder of an unfinished run holds its checkpoints, so it is only cleared on a fresh start that has
    nothing to lose, or with --force. Only the main process writes; the others wait for it.
    """
    from accelerate import PartialState

    staging = rundir.staging_dir_for(run_dir)
    state = PartialState(cpu=not torch.cuda.is_available())
    checkpoint = checkpoints.resume_checkpoint(staging, resume) if resume else None
    if checkpoint is None and checkpoints.complete_checkpoints(staging) and not force:
        raise UserError(
            f"{staging} holds checkpoints of an unfinished run: add --resume to continue it, or --force to discard "
            "them and start again"
        )
    if state.is_main_process:
        if checkpoint is None and staging.exists():
            shutil.rmtree(staging)
        elif checkpoint is not None:
            checkpoints.remove_incomplete(staging)
        staging.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------
# Trainer


def withhold_secrets(args: dict[str, Any]) -> dict[str, Any]:
    """Keep credentials out of the trainer's arguments, which are pickled into every checkpoint (training_args.bin).

    A hub token goes to the environment variable huggingface_hub reads (HF_TOKEN), so pushing still works; any other
    credential-looking field is dropped from the arguments. recipe.yaml records them as '<redacted>'.
    """
    kept = {}
    for key, value in args.items():
        if isinstance(value, str) and value and is_secret_key(key):
            if key == "hub_token":
                os.environ["HF_TOKEN"] = value
            continue
        kept[key] = value
    return kept


def sft_config(recipe: Recipe, output_dir: Path, has_eval: bool, resolved: Resolved | None = None):
    """trl's SFTConfig from the recipe; precision follows the compute dtype (no silent fp32 on GPU or bf16 on CPU)."""
    from trl import SFTConfig

    resolved = resolved or resolve(recipe)
    args = {**withhold_secrets(training_args(recipe)), "packing": resolved.packing, "optim": resolved.optim}
    args.update(bf16=resolved.bf16, fp16=resolved.fp16)
    # Without a GPU, several processes must still form one DDP group (gloo); Trainer only does that with use_cpu.
    args["use_cpu"] = resolved.use_cpu
    # Every LoRA weight takes part in every forward, so DDP need not search the graph for unused ones (slow, and it
    # breaks with gradient checkpointing); FSDP/DeepSpeed ignore the flag.
    args.setdefault("ddp_find_unused_parameters", False)
    if not has_eval:
        args["eval_strategy"] = "no"
        if args.get("load_best_model_at_end"):
            raise UserError("training.load_best_model_at_end: the recipe has no held-out data to pick the best by")
    try:
        return SFTConfig(output_dir=str(output_dir), max_length=recipe.data.max_length, **args)
    except (ValueError, TypeError) as exc:
        message = str(exc).strip().replace("\n", " ")
        raise UserError(f"{culprit_key(args, message)}: {message}") from None


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


class LogLastStep(TrainerCallback):
    """Log the final step too, so a run shorter than logging_steps (or not a multiple of it) records its last loss."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


class TokenCountingTrainer(checkpoints.AtomicCheckpoints, SFTTrainer):
    """SFTTrainer that counts the tokens that actually enter the loss (labels shifted by one, -100 excluded), logs
    throughput and memory beside the loss, and writes checkpoints atomically. Counts live on the instance."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_tokens = 0
        self.last_log = (0, time.perf_counter())
        self.full_logits_loss = False  # set by make_trainer (see full_logits_fit)

    def create_accelerator_and_postprocess(self) -> None:
        launch.fsdp_on_cpu(
            self.args.mixed_precision
        )  # FSDP2 on CPU processes over gloo: accelerate sets FSDP up on accelerators only
        super().create_accelerator_and_postprocess()

    def compute_loss(self, model, inputs, *args, **kwargs):
        if not self.model.training:
            return super().compute_loss(model, inputs, *args, **kwargs)
        self.loss_tokens += int((inputs["labels"][:, 1:] != data_stage.IGNORE_INDEX).sum())
        counted = self._total_train_tokens
        if self.full_logits_loss:
            # The model's own cross-entropy (transformers' Trainer.compute_loss, summed over the trained tokens and
            # divided by num_items_in_batch like trl's); trl's entropy and token accuracy are not logged then.
            result = Trainer.compute_loss(self, model, inputs, *args, **kwargs)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        else:
            result = super().compute_loss(model, inputs, *args, **kwargs)
        if self.full_logits_loss or isinstance(self.data_collator, PackedRowsCollator):
            # trl counts one row's width when there is no attention mask; count every row's real tokens.
            pad_token_id = self.processing_class.pad_token_id
            real = torch.tensor(real_token_count(inputs, pad_token_id), device=self.args.device)
            self._total_train_tokens = counted + int(self.accelerator.gather_for_metrics(real).sum())
        return result

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs.update(self.throughput_since_last_log())
        return super().log(logs, *args, **kwargs)

    def throughput_since_last_log(self) -> dict[str, float]:
        """Trained tokens per second (all ranks) since the previous log, and peak memory of this process so far."""
        tokens_then, time_then = self.last_log
        now = time.perf_counter()
        self.last_log = (self.loss_tokens, now)
        world = max(self.args.world_size, 1)  # every rank trains on its own equal share of the global batch
        rate = (self.loss_tokens - tokens_then) * world / (now - time_then) if now > time_then else 0.0
        return {"tokens_per_second": round(rate, 2), "peak_memory_mib": round(rundir.peak_memory_bytes() / 2**20, 1)}


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


# Below this size a micro-batch's float32 logits cost less than trl's chunked LM head saves in memory, and the plain
# cross-entropy is faster: one matmul and one fused loss instead of tiles with log-softmax, entropy and top-1 each.
FULL_LOGITS_LIMIT_BYTES = 256 * 2**20


def full_logits_fit(config, model) -> bool:
    """Whether a micro-batch's logits are small enough to compute the loss on them whole (see FULL_LOGITS_LIMIT_BYTES).

    Positions per micro-batch x vocabulary x 4 bytes (the float32 upcast the loss makes); packing fills every row to
    max_length. The demo: 8 x 128 x 768 x 4 = 3 MiB. Llama-3.1-8B at 4 x 2048 with 128,256 tokens: 4 GiB (chunked).
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    positions = config.per_device_train_batch_size * (config.max_length or 1024)
    return positions * vocab * 4 <= FULL_LOGITS_LIMIT_BYTES


def keep_packed_rows_apart(trainer, model, config) -> bool:
    """Swap trl's one-row padding-free collator for separate packed rows unless the kernel is varlen (see collate)."""
    kernel = getattr(model.config, "_attn_implementation", None)
    if not getattr(trainer, "padding_free", False) or packed_layout(kernel) == "one-row":
        return False
    trainer.data_collator = PackedRowsCollator(trainer.processing_class.pad_token_id, config.pad_to_multiple_of)
    return True


def make_trainer(
    recipe: Recipe,
    model,
    tokenizer,
    prepared: data_stage.PreparedData,
    output_dir: Path,
    config=None,
    resolved: Resolved | None = None,
):
    """The trainer for a prepared model and data; ``config`` is the SFTConfig when already built (see train)."""
    resolved = resolved or resolve(recipe)
    config = config or sft_config(recipe, output_dir, prepared.eval is not None, resolved)
    adapter_weights = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
    trainer = TokenCountingTrainer(
        model=model,
        args=config,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval if config.eval_strategy != "no" else None,
        processing_class=tokenizer,
    )
    keep_adapter_dtype(model, adapter_weights, resolved.compute_dtype)
    keep_packed_rows_apart(trainer, model, config)
    if resolved.memory.selective:
        from trl.models import enable_selective_activation_checkpointing

        # trl wraps the PEFT wrapper, but transformers enables checkpointing on the base model: wrap that too.
        enable_selective_activation_checkpointing(model.get_base_model())
    trainer.full_logits_loss = full_logits_fit(config, model)
    fsdp_plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None and fsdp_plugin.fsdp_version == 1:
        from peft.utils.other import fsdp_auto_wrap_policy

        # Wrap LoRA layers on their own, so FSDP1 never flattens trainable and frozen weights into one tensor. FSDP2
        # shards each parameter on its own (no flat tensor); its groups are the decoder layers.
        fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    # In a terminal, the usual bar with one short line per log; a notebook keeps transformers' own HTML table.
    if not config.disable_tqdm and trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LossLineProgress())
    trainer.add_callback(LogLastStep())
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# Metrics and plots


def training_metrics(trainer, runtime_s: float, mean_loss: float | None) -> dict[str, Any]:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    world = max(trainer.args.world_size, 1)
    tokens = trainer.loss_tokens * world  # every rank sees its own share of the global batch
    return {
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": mean_loss,
        "steps": trainer.state.global_step,
        "train_tokens": tokens,
        # Every real token the model read (prompts and padding-free packs included, padding excluded), all ranks:
        # what other tools report as "tokens/s". The trained tokens are the ones in the loss.
        "input_tokens": int(trainer._total_train_tokens),
        "train_runtime_s": runtime_s,
        "tokens_per_second": tokens / runtime_s if runtime_s > 0 else 0.0,  # trained tokens, kept for older readers
        "trained_tokens_per_second": tokens / runtime_s if runtime_s > 0 else 0.0,
        "input_tokens_per_second": trainer._total_train_tokens / runtime_s if runtime_s > 0 else 0.0,
        "peak_memory_bytes": rundir.peak_memory_bytes(),
        "versions": rundir.versions(),
    }


def parameter_bytes(model) -> dict[str, int]:
    """Bytes of the model's parameters as stored (4-bit ones packed): whole, and the part the main process holds,
    which FSDP2 (DTensor shards) and ZeRO-3 (ds_tensor partitions) cut to about whole / processes."""
    whole = held = 0
    for param in model.parameters():
        size = param.element_size()
        local = getattr(param, "ds_tensor", None)  # ZeRO-3 keeps this rank's partition beside an emptied param
        if local is None:
            local = param.to_local() if hasattr(param, "to_local") else param
        whole += int(getattr(param, "ds_numel", param.numel())) * size
        held += local.numel() * size
    return {"whole": whole, "main_process": held}


def plot_loss(log_history: list[dict], path: Path) -> None:
    # A bare Figure, not pyplot: no global backend switched, so a notebook calling train() keeps drawing inline.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        if points:
            marker = "." if key == "eval_loss" or len(points) == 1 else None  # one point needs a marker to show
            ax.plot(*zip(*points, strict=True), marker=marker, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (trained tokens)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------------------
# The stage


def train(
    recipe: Recipe,
    run_dir: Path,
    force: bool = False,
    progress=None,
    resume: bool | str | None = None,
    inputs: dict[str, str] | None = None,
) -> RunResult:
    """Fine-tune the recipe's model and write a complete run directory at ``run_dir``.

    Args:
        recipe: The validated recipe.
        run_dir: Where the finished run goes; it is built in a hidden staging folder beside it.
        force: Replace an existing run directory, or discard an unfinished run's checkpoints.
        progress: Called with (event, payload) at each milestone, for terminal output.
        resume: True to continue from the latest complete checkpoint of the unfinished run, or a checkpoint path.
        inputs: Further paths the command reads (the recipe file), which the run directory must stay apart from.
    """
    show = progress or (lambda *args, **kwargs: None)
    resolved, checkpoint, staging, tokenizer = begin_run(
        recipe, run_dir, force, resume, {**input_paths(recipe), **(inputs or {})}, cached_data=True
    )
    prepared = data_stage.build_datasets(recipe, tokenizer)
    show("data", prepared.stats.as_dict())
    # The trainer's own checks, before the weights load.
    config = sft_config(recipe, staging, prepared.eval is not None, resolved)
    base = model_stage.load_base_model(recipe, tokenizer, resolved)
    model = model_stage.attach_lora(base, recipe, resolved)
    trainable, total = model.get_nb_trainable_parameters()
    show("model", {"trainable": trainable, "total": total, "dtype": str(resolved.compute_dtype)})
    if checkpoint is not None:
        show("resume", {"checkpoint": str(checkpoint)})

    trainer = make_trainer(recipe, model, tokenizer, prepared, staging, config, resolved)
    if recipe.eval.callback_steps and prepared.eval_rows:
        from qlora_kit.evaluate.callback import generation_eval_callback

        trainer.add_callback(generation_eval_callback(trainer, tokenizer, prepared.eval_rows, recipe))
    main = trainer.is_world_process_zero()
    with tracking.tracked_run(recipe, trainer.args, staging, run_dir, checkpoint is not None, main) as tracked:
        metrics = _train_and_publish(
            trainer, model, tokenizer, recipe, resolved, prepared, checkpoint, run_dir, tracked
        )
    show("done", {"run_dir": str(run_dir), **metrics})
    return RunResult(run_dir=run_dir, metrics=metrics, model=model)


def _train_and_publish(trainer, model, tokenizer, recipe, resolved, prepared, checkpoint, run_dir, tracked) -> dict:
    """Train, save the adapter (every rank), and on the main process write the outputs, log them and publish."""
    staging = rundir.staging_dir_for(run_dir)
    started = time.perf_counter()
    result = run_training(trainer, checkpoint, staging)
    runtime = time.perf_counter() - started
    metrics = training_metrics(trainer, runtime, result.training_loss if result else None)
    metrics["data"] = prepared.stats.as_dict()
    metrics["launch"] = {
        "mode": resolved.launch.mode,
        "processes": trainer.args.world_size,
        "resumed_from": str(checkpoint.relative_to(staging)) if checkpoint else None,
        "parameter_bytes": parameter_bytes(model),
    }

    save_adapter(trainer, tokenizer, staging / "adapter")  # every rank: FSDP/ZeRO-3 gather the shards here
    if trainer.is_world_process_zero():
        metrics.update(_compare(model, tokenizer, prepared, recipe, resolved.launch))
        _write_outputs(trainer, recipe, resolved, staging, metrics)
        tracking.finish_training(tracked, staging, run_dir)
        rundir.publish(staging, run_dir)
    trainer.accelerator.wait_for_everyone()
    return metrics


def begin_run(
    recipe: Recipe,
    run_dir: Path,
    force: bool,
    resume: bool | str | None,
    inputs: dict[str, str],
    cached_data: bool,
) -> tuple[Resolved, Path | None, Path, Any]:
    """What every training method does before its data: pre-flight (every machine-dependent setting, decided and
    checked before any weight loads), the output checks against ``inputs`` (every path the command reads), the
    staging folder, the seed, and a safe tokenizer.

    Returns the resolved settings, the checkpoint to resume from (or None), the staging folder and the tokenizer.
    """
    from transformers import set_seed

    resolved = launch.preflight(recipe)
    rundir.prepare_output(run_dir, force, inputs)
    if cached_data:
        data_cache.check_writable(recipe.data)
    checkpoint = prepare_staging(run_dir, force, resume)
    set_seed(training_args(recipe)["seed"])
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    tokenizer_rules.check_pad_token(tokenizer)
    return resolved, checkpoint, rundir.staging_dir_for(run_dir), tokenizer


def run_training(trainer, checkpoint: Path | None, staging: Path):
    """Train (from the checkpoint when given); on SIGTERM/SIGINT save a checkpoint and raise TrainingStopped."""
    stopper = checkpoints.StopOnSignal(trainer)
    trainer.add_callback(stopper)
    trainer.last_log = (0, time.perf_counter())
    with checkpoints.signals_stop(stopper):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stopper.signum is not None and trainer.state.global_step < trainer.state.max_steps:
        saved = staging / f"checkpoint-{trainer.state.global_step}"
        raise TrainingStopped(
            stopper.signum, trainer.state.global_step, saved if checkpoints.is_complete(saved) else None
        )
    if trainer.state.global_step == 0:
        # Nothing trained: publishing would present the untouched base as a fine-tuned run.
        raise UserError(
            "training ran no step (the data and training.max_steps/num_train_epochs give an empty schedule): "
            "nothing was published; add data or raise training.max_steps"
        )
    return result


def save_adapter(trainer, tokenizer, adapter_dir: Path) -> None:
    """Write the one complete adapter; all ranks call this, only the main process writes files."""
    fsdp_plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None:
        # Checkpoints stay sharded (fast); the adapter users load must be gathered from every rank.
        fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(adapter_dir))
        # training_args.bin is a pickle of every argument; the resolved recipe.yaml already records them, redacted.
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)


def _compare(model, tokenizer, prepared, recipe: Recipe, plan: Launch) -> dict[str, Any]:
    if prepared.eval is None and not prepared.eval_rows:
        return {}
    if plan.sharded:
        # The main process alone holds only its shard of the weights; the comparison needs the whole model.
        return {"comparison_skipped": f"{plan.mode} shards the model; evaluate the saved adapter instead"}
    pairs = data_stage.eval_prompts(prepared.eval_rows, tokenizer, recipe.eval.num_samples)
    return {
        "comparison": compare_base_and_tuned(
            model, tokenizer, prepared.eval, pairs, recipe.eval.max_examples, recipe.eval.max_new_tokens
        )
    }


def _write_outputs(trainer, recipe: Recipe, resolved: Resolved, staging: Path, metrics: dict[str, Any]) -> None:
    written = resolved_dict(recipe)
    # Record what "auto" became on this machine, as the run used it, so the run can be reproduced elsewhere.
    for section, fields in resolved.recipe_fields().items():
        written[section].update(fields)
    (staging / "recipe.yaml").write_text(to_yaml(written))
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss(trainer.state.log_history, staging / "loss_curve.png")
