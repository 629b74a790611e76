"""Preference tuning on the 4-bit base: DPO, ORPO, KTO and SimPO through trl's own trainers.

The run directory, staging, atomic checkpoints, resume and machine settings are the SFT stage's (train.py); what
differs is the data (qlora_kit.data.preference tokenizes every pair itself) and the trainer. No second model is
loaded: DPO and KTO compare against a reference that lives in the same model object,

- a fresh adapter: the 4-bit base with the adapter disabled (trl's ``ref_model=None`` with a peft model);
- ``model.adapter`` (an SFT run or any PEFT adapter) trained further: a frozen copy of that starting adapter (a few MB
  of LoRA weights on the same base), so the reference is the SFT model the run started from.

ORPO and SimPO need no reference at all.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from transformers.trainer_callback import ProgressCallback
from trl import DPOTrainer, KTOTrainer

from qlora_kit import checkpoints, rundir, tracking
from qlora_kit import model as model_stage
from qlora_kit import train as train_stage
from qlora_kit.data import preference as pref_data
from qlora_kit.errors import UserError
from qlora_kit.evaluate import preference as pref_eval
from qlora_kit.recipe import Recipe, config_class, culprit_key, resolved_dict, to_yaml, training_args
from qlora_kit.resolve import Resolved

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # trl.experimental announces itself on import
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

REFERENCE_ADAPTER = "ref"  # the name trl gives the frozen copy of a starting adapter


# ---------------------------------------------------------------------------------------------------------------
# Trainers: trl's, fed qlora-kit's tokens, with atomic checkpoints


class TokenizedPairs(checkpoints.AtomicCheckpoints, DPOTrainer):
    """DPOTrainer on pairs already tokenized by qlora_kit.data.preference (prompt_ids, chosen_ids, rejected_ids)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class TokenizedUnpaired(checkpoints.AtomicCheckpoints, KTOTrainer):
    """KTOTrainer on rows already tokenized (prompt_ids, completion_ids, label); adds KTO's mismatched KL pairs."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset
        # As trl does: each batch's completions rotated by one give the mismatched pairs that estimate the KL term.
        return dataset.map(rotate_completions, batched=True, batch_size=args.per_device_train_batch_size)


def rotate_completions(batch: dict[str, list]) -> dict[str, list]:
    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
    return batch


class PairFeatures:
    """For ORPO and CPO, whose trainers tokenize each row themselves: build their features from qlora-kit's ids."""

    def tokenize_row(self, feature, model=None) -> dict[str, list[int]]:
        prompt = feature["prompt_ids"]
        out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            ids = prompt + feature[f"{side}_ids"]
            out[f"{side}_input_ids"] = ids
            out[f"{side}_attention_mask"] = [1] * len(ids)
            out[f"{side}_labels"] = [-100] * len(prompt) + feature[f"{side}_ids"]
        return out


class TokenizedORPO(checkpoints.AtomicCheckpoints, PairFeatures, ORPOTrainer):
    """ORPOTrainer on qlora-kit's tokenized pairs."""


class TokenizedSimPO(checkpoints.AtomicCheckpoints, PairFeatures, CPOTrainer):
    """CPOTrainer (loss_type simpo, cpo_alpha 0) on qlora-kit's tokenized pairs."""


TRAINERS = {"dpo": TokenizedPairs, "kto": TokenizedUnpaired, "orpo": TokenizedORPO, "simpo": TokenizedSimPO}


def preference_config(recipe: Recipe, output_dir: Path, has_eval: bool, resolved: Resolved):
    """The method's trl config from the recipe, with the machine's precision, optimizer and device settings."""
    args = {**train_stage.withhold_secrets(training_args(recipe)), "optim": resolved.optim}
    args.update(bf16=resolved.bf16, fp16=resolved.fp16, use_cpu=resolved.use_cpu, max_length=recipe.data.max_length)
    args.setdefault("ddp_find_unused_parameters", False)
    if recipe.method in ("orpo", "simpo"):
        args["remove_unused_columns"] = False  # their collator reads the columns tokenize_row adds
    if not has_eval:
        args["eval_strategy"] = "no"
    try:
        return config_class(recipe.method)(output_dir=str(output_dir), **args)
    except (ValueError, TypeError) as exc:
        message = str(exc).strip().replace("\n", " ")
        raise UserError(f"{culprit_key(args, message)}: {message}") from None


def adapter_folder(path: str) -> Path:
    """The adapter folder ``model.adapter`` names: a run directory's adapter/, or the folder itself."""
    folder = Path(path).expanduser()
    if rundir.is_run(folder):
        folder = folder / "adapter"
    if not folder.is_dir():
        raise UserError(f"model.adapter: {path} is not a folder: give a run directory (runs/sft) or a PEFT adapter")
    model_stage.check_adapter_files(folder)
    return folder


def policy_model(recipe: Recipe, tokenizer, resolved: Resolved):
    """The 4-bit base with the adapter to train: fresh LoRA, or ``model.adapter`` loaded trainable."""
    from peft import PeftModel

    base = model_stage.load_base_model(recipe, tokenizer, resolved)
    if recipe.model.adapter is None:
        return model_stage.attach_lora(base, recipe, resolved)
    folder = adapter_folder(recipe.model.adapter)
    base = model_stage.prepare_for_training(base, recipe, resolved)
    try:
        return PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    except model_stage.LOAD_ERRORS as exc:
        raise model_stage.weights_error("model.adapter", folder, exc) from None


def make_trainer(recipe: Recipe, model, tokenizer, data: pref_data.PreferenceData, config, resolved: Resolved):
    """trl's trainer for the method; the reference lives in ``model`` (see the module docstring)."""
    adapter_weights = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
    evaluation = data.eval if config.eval_strategy != "no" else None
    if recipe.method == "kto" and evaluation is not None and "chosen_ids" in evaluation.column_names:
        evaluation = pref_data.unpair_tokenized(evaluation)  # KTO's eval loss reads rows; the pairs score rewards
    trainer = TRAINERS[recipe.method](
        model=model,
        args=config,
        train_dataset=data.train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
    )
    train_stage.keep_adapter_dtype(model, adapter_weights, resolved.compute_dtype)
    if recipe.model.adapter is None and REFERENCE_ADAPTER in model.peft_config:
        # trl copies the starting adapter as the reference; a fresh LoRA starts at zero, so its copy is the base
        # itself: drop it, and the reference is the adapter-disabled base.
        model.delete_adapter(REFERENCE_ADAPTER)
    if not config.disable_tqdm and trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(train_stage.LossLineProgress())
    trainer.add_callback(train_stage.LogLastStep())
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# Held-out comparison


def reference_context(model):
    """The reference inside ``model``: the frozen starting adapter when there is one, else the adapter disabled."""
    from trl.trainer.utils import use_adapter

    return use_adapter(model, REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else None)


def compare(model, tokenizer, dataset, recipe: Recipe, beta: float) -> dict[str, Any]:
    """Base (adapter disabled), reference (when it is the starting adapter) and tuned, on held-out pairs."""
    if dataset is None or "chosen_ids" not in dataset.column_names:
        return {}
    args = (tokenizer.pad_token_id, recipe.eval.batch_size, recipe.eval.max_examples)
    with model.disable_adapter():
        base = pref_eval.pair_logps(model, dataset, *args)
    reference = base
    results = {}
    if REFERENCE_ADAPTER in model.peft_config:
        with reference_context(model):
            reference = pref_eval.pair_logps(model, dataset, *args)
        results["reference"] = pref_eval.metrics(*reference, None, beta)
    results["base"] = pref_eval.metrics(*base, None, beta)
    if reference is not base:
        results["base"] = pref_eval.metrics(*base, reference, beta)
    results["tuned"] = pref_eval.metrics(*pref_eval.pair_logps(model, dataset, *args), reference, beta)
    return results


# ---------------------------------------------------------------------------------------------------------------
# The stage


def input_paths(recipe: Recipe) -> dict[str, str]:
    paths = train_stage.input_paths(recipe)
    if recipe.model.adapter and Path(recipe.model.adapter).expanduser().exists():
        paths["model.adapter"] = recipe.model.adapter
    return paths


def train(
    recipe: Recipe,
    run_dir: Path,
    force: bool = False,
    progress=None,
    resume: bool | str | None = None,
    inputs: dict[str, str] | None = None,
) -> train_stage.RunResult:
    """Preference-tune the recipe's model into a complete run directory at ``run_dir`` (see train.train)."""
    show = progress or (lambda *args, **kwargs: None)
    resolved, checkpoint, staging, tokenizer = train_stage.begin_run(
        recipe, run_dir, force, resume, {**input_paths(recipe), **(inputs or {})}, cached_data=True
    )
    data = pref_data.build(recipe, tokenizer)
    show("preference_data", data.stats.as_dict())
    config = preference_config(recipe, staging, data.eval is not None, resolved)
    if recipe.model.adapter:
        adapter_folder(recipe.model.adapter)  # a missing adapter is reported before the base loads
    model = policy_model(recipe, tokenizer, resolved)
    trainable, total = model.get_nb_trainable_parameters()
    show("model", {"trainable": trainable, "total": total, "dtype": str(resolved.compute_dtype)})
    trainer = make_trainer(recipe, model, tokenizer, data, config, resolved)
    main = trainer.is_world_process_zero()
    # MLflow's store and trackio's run name, as for SFT: the trackers log into the run, and its files are artifacts.
    with tracking.tracked_run(recipe, trainer.args, staging, run_dir, checkpoint is not None, main) as tracked:
        metrics = _train_and_publish(trainer, model, tokenizer, recipe, resolved, data, config, checkpoint, run_dir,
                                     tracked)  # fmt: skip
    show("preference_done", {"run_dir": str(run_dir), **metrics})
    return train_stage.RunResult(run_dir=run_dir, metrics=metrics, model=model)


def _train_and_publish(trainer, model, tokenizer, recipe, resolved, data, config, checkpoint, run_dir, tracked):
    staging = rundir.staging_dir_for(run_dir)
    started = time.perf_counter()
    result = train_stage.run_training(trainer, checkpoint, staging)
    metrics = run_metrics(trainer, time.perf_counter() - started, result, data, recipe)
    metrics["launch"] = {"processes": trainer.args.world_size, "resumed_from": str(checkpoint) if checkpoint else None}
    if trainer.is_world_process_zero():
        metrics["preference_comparison"] = compare(model, tokenizer, data.eval, recipe, getattr(config, "beta", 0.1))
    if REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)  # the run's adapter is the trained one alone
    train_stage.save_adapter(trainer, tokenizer, staging / "adapter")
    if trainer.is_world_process_zero():
        write_outputs(trainer, recipe, resolved, staging, metrics)
        tracking.finish_training(tracked, staging, run_dir)
        rundir.publish(staging, run_dir)
    trainer.accelerator.wait_for_everyone()
    return metrics


def run_metrics(trainer, runtime_s: float, result, data: pref_data.PreferenceData, recipe: Recipe) -> dict[str, Any]:
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    accuracies = [entry["rewards/accuracies"] for entry in history if "rewards/accuracies" in entry]
    return {
        "method": recipe.method,
        "started_from": recipe.model.adapter,
        "started_from_sha256": adapter_digest(recipe.model.adapter),
        "reference": reference_description(recipe),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": result.training_loss if result else None,
        "train_reward_accuracy_last": accuracies[-1] if accuracies else None,
        "steps": trainer.state.global_step,
        "train_runtime_s": runtime_s,
        "peak_memory_bytes": rundir.peak_memory_bytes(),
        "data": data.stats.as_dict(),
        "versions": rundir.versions(),
    }


def adapter_digest(path: str | None) -> str | None:
    """SHA-256 of the starting adapter's weights file, so a run says which bytes it continued (the path may change)."""
    import hashlib

    if path is None:
        return None
    weights = adapter_folder(path) / "adapter_model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None


def reference_description(recipe: Recipe) -> str:
    if recipe.method in ("orpo", "simpo"):
        return "none (reference-free objective)"
    if recipe.model.adapter:
        return f"the starting adapter {recipe.model.adapter}, frozen, on the same 4-bit base"
    return "the same 4-bit base with the adapter disabled"


def write_outputs(trainer, recipe: Recipe, resolved: Resolved, staging: Path, metrics: dict[str, Any]) -> None:
    import json

    written = resolved_dict(recipe)
    for section, fields in resolved.recipe_fields().items():
        written[section].update(fields)
    for key in ("packing",):  # an SFT-only setting, not a field of the preference configs
        written["training"].pop(key, None)
    (staging / "recipe.yaml").write_text(to_yaml(written))
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    train_stage.plot_loss(trainer.state.log_history, staging / "loss_curve.png")


def peak_parameter_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once (for the no-second-model check)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
