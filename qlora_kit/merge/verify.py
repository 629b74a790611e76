"""Verification: the merged model against the adapter on the 4-bit base it was trained against.

Both run the same held-out examples one at a time (no padding, so nothing but the weights differs): max and mean
absolute logit difference over every position and vocabulary entry, held-out loss on the trained tokens, and greedy
generations. Only one model is in memory at a time; the reference logits wait on disk. Both compute in float32
whatever their weights are stored in (``model.compute_in_float32``): in bf16, two models that hold the same function
disagree by their rounding alone, more with every layer, which would hide or mimic what the merge changed.

Before that, the adapter's held-out loss is compared with the one ``train`` recorded in metrics.json: a base
checkpoint that changed since training (another revision) shows up there, even though both sides of the merged-vs-
adapter comparison would use the changed base.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit import data as data_stage
from qlora_kit import model as model_stage
from qlora_kit.data.sources import BadRows
from qlora_kit.errors import UserError
from qlora_kit.evaluate import generate, heldout_loss
from qlora_kit.merge.adapter import Adapter
from qlora_kit.recipe import Recipe
from qlora_kit.resolve import resolve


@dataclass
class VerificationSet:
    """The examples and prompts both models run, and where they came from."""

    examples: list[tuple[list[int], list[int]]]
    prompts: list[str]
    source: str
    eval_dataset: Any  # the whole held-out set, as train evaluated it (for the base check)


def checked_examples(recipe: Recipe, tokenizer, what: str, skip_key: str):
    """The run's data as training prepared it, and the examples a check scores: the held-out ones, or without any
    the training ones; (prepared, dataset, where they come from). A data error says how to skip the check."""
    try:
        prepared = data_stage.build_datasets(recipe, tokenizer)
    except UserError as exc:
        raise UserError(
            f"{exc} ({what} reads the run's data: fix the path with an override, or skip it with {skip_key}=false)"
        ) from None
    if prepared.eval is not None:
        return prepared, prepared.eval, "held-out"
    return prepared, prepared.train, "training (the recipe has no held-out data)"


def verification_set(recipe: Recipe, tokenizer) -> VerificationSet:
    """The run's held-out examples (or, without any, its first training examples) tokenized as training did."""
    merge = recipe.merge
    if recipe.method != "sft":
        return preference_verification_set(recipe, tokenizer)
    prepared, dataset, source = checked_examples(recipe, tokenizer, "verification", "merge.verify")
    examples = list(zip(dataset["input_ids"], dataset["labels"], strict=True))[: merge.verify_examples]
    prompts = [p for p, _ in data_stage.eval_prompts(prepared.eval_rows, tokenizer, merge.verify_generations)]
    return VerificationSet(examples, prompts, source, prepared.eval)


def preference_verification_set(recipe: Recipe, tokenizer) -> VerificationSet:
    """For a preference run: prompt + preferred answer (chosen, or KTO's completion) scored on the answer, and the
    prompts generated from. No SFT loss was recorded at training time, so the base check is skipped."""
    from qlora_kit.data import preference as pref_data

    data = pref_data.build(recipe, tokenizer)
    if data.eval is not None:
        dataset, rows = data.eval, data.eval_rows
    else:  # the tokenized training set may come from the cache; its rows (for the prompts) are read again
        dataset = data.train
        rows, _ = pref_data.collect(recipe, BadRows(recipe.data.max_bad_rows), pref_data.PreferenceStats())
    side = "chosen_ids" if "chosen_ids" in dataset.column_names else "completion_ids"
    examples = [
        (prompt + answer, [data_stage.IGNORE_INDEX] * len(prompt) + answer)
        for prompt, answer in zip(dataset["prompt_ids"], dataset[side], strict=True)
    ][: recipe.merge.verify_examples]
    answers = [row.data.get("chosen", row.data.get("completion")) for row in rows[: recipe.merge.verify_generations]]
    prompts = [pref_data.render(tokenizer, row.data["prompt"], a)[0] for row, a in zip(rows, answers, strict=False)]
    source = "held-out" if data.eval is not None else "training (the recipe has no held-out data)"
    return VerificationSet(examples, prompts, source, None)


@torch.no_grad()
def run_examples(model, tokenizer, heldout: VerificationSet, max_new_tokens: int, on_logits) -> dict[str, Any]:
    """Logits (handed to ``on_logits``), loss on the trained tokens, and greedy generations."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for index, (ids, labels) in enumerate(heldout.examples):
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        on_logits(index, logits)
        targets = torch.tensor(labels[1:], device=device)
        total += torch.nn.functional.cross_entropy(
            logits[:-1], targets, ignore_index=data_stage.IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((targets != data_stage.IGNORE_INDEX).sum())
    generations = generate(model, tokenizer, heldout.prompts, max_new_tokens) if heldout.prompts else []
    return {"loss": total / max(count, 1), "generations": generations}


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_base_unchanged(model, tokenizer, recipe: Recipe, heldout: VerificationSet, metrics: dict) -> dict[str, Any]:
    """The adapter's held-out loss now must be the one recorded at training time, or the base is not the same."""
    recorded = (metrics.get("comparison") or {}).get("eval_loss_tuned")
    if recorded is None or heldout.eval_dataset is None:
        return {"checked": False, "why": "no held-out loss was recorded at training time"}
    now = heldout_loss(model, heldout.eval_dataset, tokenizer.pad_token_id, max_examples=recipe.eval.max_examples)
    if abs(now - recorded) > recipe.merge.max_loss_diff:
        raise UserError(
            f"the adapter on base {recipe.model.name_or_path!r} gives held-out loss {now:.4f}, but "
            f"{recorded:.4f} at training time: this base is not the one the adapter was trained against "
            "(another revision or other weights?); pin model.revision or point model.name_or_path to it"
        )
    return {"checked": True, "recorded_eval_loss": recorded, "eval_loss_now": now}


def reference_pass(
    recipe: Recipe, adapters: list[Adapter], tokenizer, heldout: VerificationSet, logits_dir: Path, metrics: dict
) -> dict[str, Any]:
    """Run the adapter(s) on the 4-bit base; save its logits; return its loss, generations and the base check."""
    from peft.tuners.lora import LoraLayer

    model = model_stage.load_adapter_model(recipe, adapters[0].path, tokenizer)
    base_check = check_base_unchanged(model, tokenizer, recipe, heldout, metrics)
    if model_stage.repacked_for_cpu(model):  # the check ran bitsandbytes' bf16 CPU kernel: load the weights again
        _free(model)
        model = model_stage.load_adapter_model(recipe, adapters[0].path, tokenizer)
    names = ["default"]
    for index, extra in enumerate(adapters[1:]):
        names.append(f"merge_{index}")
        model.load_adapter(str(extra.path), adapter_name=names[-1])
    model.base_model.set_adapter(names, inference_mode=True)
    weights = {name: adapter.weight for name, adapter in zip(names, adapters, strict=True)}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, weight in weights.items():
                if name in module.scaling:
                    module.scaling[name] *= weight  # peft sums active adapters: weighted sum = weighted scalings
    model_stage.compute_in_float32(model)  # after the base check, which repeats training's own evaluation

    def save(index: int, logits: torch.Tensor) -> None:
        torch.save(logits.cpu(), logits_dir / f"{index}.pt")

    result = run_examples(model, tokenizer, heldout, recipe.eval.max_new_tokens, save)
    _free(model)
    return {**result, "base_check": base_check}


def merged_pass(
    folder: Path, dtype: torch.dtype, tokenizer, recipe: Recipe, heldout: VerificationSet, logits_dir: Path
) -> dict[str, Any]:
    """Load the merged folder with plain transformers and compare it, example by example, with the saved logits."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map=resolve(recipe).device_map, output_loading_info=True
    )
    problems = {key: sorted(value) for key, value in info.items() if value and key != "error_msgs"}
    model_stage.compute_in_float32(model)
    diffs = {"max": 0.0, "sum": 0.0, "count": 0}

    def compare(index: int, logits: torch.Tensor) -> None:
        reference = torch.load(logits_dir / f"{index}.pt").to(logits.device)
        delta = (logits - reference).abs()
        diffs["max"] = max(diffs["max"], delta.max().item())
        diffs["sum"] += delta.sum().item()
        diffs["count"] += delta.numel()

    result = run_examples(model, tokenizer, heldout, recipe.eval.max_new_tokens, compare)
    _free(model)
    mean = diffs["sum"] / max(diffs["count"], 1)
    return {**result, "max_abs_logit_diff": diffs["max"], "mean_abs_logit_diff": mean, "loading_problems": problems}


def judge(recipe: Recipe, strategy: str, heldout: VerificationSet, reference: dict, merged: dict) -> dict[str, Any]:
    """The verification numbers, the thresholds, and which were exceeded."""
    merge = recipe.merge
    pairs = list(zip(heldout.prompts, reference["generations"], merged["generations"], strict=True))
    agreement = sum(a == b for _, a, b in pairs) / len(pairs) if pairs else None
    report = {
        "examples": len(heldout.examples),
        "source": heldout.source,
        "compute_dtype": "float32",
        "max_abs_logit_diff": merged["max_abs_logit_diff"],
        "mean_abs_logit_diff": merged["mean_abs_logit_diff"],
        "loss_adapter": reference["loss"],
        "loss_merged": merged["loss"],
        "loss_diff": abs(merged["loss"] - reference["loss"]),
        "generation_agreement": agreement,
        "generations": [{"prompt": p, "adapter": a, "merged": b, "agree": a == b} for p, a, b in pairs],
        "base_check": reference["base_check"],
        "thresholds": {
            key: getattr(merge, key)
            for key in ("max_abs_logit_diff", "mean_abs_logit_diff", "max_loss_diff", "min_generation_agreement")
        },
    }
    failures = [
        f"{key.replace('_', ' ')} {report[key]:.3g} > {limit:g}"
        for key, limit in (
            ("max_abs_logit_diff", merge.max_abs_logit_diff),
            ("mean_abs_logit_diff", merge.mean_abs_logit_diff),
            ("loss_diff", merge.max_loss_diff),
        )
        if report[key] > limit
    ]
    if agreement is not None and agreement < merge.min_generation_agreement:
        failures.append(f"generation agreement {agreement:.0%} < {merge.min_generation_agreement:.0%}")
    if merged["loading_problems"]:
        failures.append(f"the merged folder loads with problems: {json.dumps(merged['loading_problems'])[:200]}")
    enforced = merge.enforce_thresholds if merge.enforce_thresholds is not None else strategy == "dequantized"
    return {**report, "failures": failures, "enforced": enforced, "passed": not failures}
