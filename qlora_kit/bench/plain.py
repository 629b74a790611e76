"""The baseline side of ``bench train``: what a user writes by hand with trl alone.

A 4-bit model from ``AutoModelForCausalLM.from_pretrained`` with the recipe's ``BitsAndBytesConfig``, a peft
``LoraConfig`` passed as ``peft_config``, the raw rows given to trl's trainer for the method (SFTTrainer, DPOTrainer,
ORPOTrainer, KTOTrainer, CPOTrainer with the SimPO loss), and trl's defaults for everything the recipe does not set.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.model import lora_config

# Keys of qlora-kit's trainer arguments a hand-written script leaves at trl's defaults.
TOOLKIT_ONLY = ("packing", "padding_free", "gradient_checkpointing_kwargs")


def plain_tokenizer(recipe):
    """The model's own tokenizer; the recipe's chat template only where the tokenizer has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.tokenizer_name_or_path or recipe.model.name_or_path)
    if tokenizer.chat_template is None:
        tokenizer_rules.set_chat_template(tokenizer, recipe.model.chat_template)
    return tokenizer


def plain_model(recipe, resolved):
    """``from_pretrained`` with the recipe's BitsAndBytesConfig, compute dtype and device map."""
    from transformers import AutoModelForCausalLM

    from qlora_kit import model as model_stage

    return AutoModelForCausalLM.from_pretrained(
        recipe.model.name_or_path,
        quantization_config=model_stage.quantization_config(recipe, resolved),
        dtype=resolved.compute_dtype,
        device_map=resolved.device_map,
    )


def config_args(recipe, resolved, training: dict[str, Any]) -> dict[str, Any]:
    """The trl config's arguments: the recipe's batch, optimizer, schedule and checkpointing with ``training`` on top,
    the machine's precision, ``max_length``; trl's defaults for the rest."""
    from qlora_kit.recipe import training_args

    shared = {**training_args(recipe), **training}
    args = {k: v for k, v in shared.items() if k not in (*TOOLKIT_ONLY, "bf16", "fp16")}
    dtype = resolved.compute_dtype
    return {
        **args,
        "max_length": recipe.data.max_length,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
    }


def sft_trainer(recipe, training: dict[str, Any], workdir: Path):
    """SFTTrainer on the raw rows (``messages``, ``prompt``/``completion`` or ``text``), no packing."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from qlora_kit.resolve import resolve

    resolved = resolve(recipe)
    tokenizer = plain_tokenizer(recipe)
    model = plain_model(recipe, resolved)
    config = SFTConfig(output_dir=str(workdir), **config_args(recipe, resolved, training))
    rows = datasets.Dataset.from_list(sft_rows(recipe))
    return SFTTrainer(
        model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=lora_config(recipe)
    )


def sft_rows(recipe) -> list[dict[str, Any]]:
    """The training rows as the files hold them, with only the columns of their format (trl does the rest)."""
    from qlora_kit import data as data_stage

    columns = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
    rows = []
    for index, source in enumerate(recipe.data.train):
        for row in data_stage.read_formatted(source, f"data.train.{index}"):
            rows.append({c: row.data[c] for c in columns[row.fmt]})
    return rows


def trainer_class(method: str) -> type:
    """trl's own trainer for a preference method (SimPO is CPOTrainer with loss_type simpo, cpo_alpha 0)."""
    from trl import DPOTrainer, KTOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental announces itself on import
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
    return {"dpo": DPOTrainer, "kto": KTOTrainer, "orpo": ORPOTrainer, "simpo": CPOTrainer}[method]


def preference_rows(recipe, split: str = "train") -> list[dict[str, Any]]:
    """The preference rows (``prompt``/``chosen``/``rejected``, or KTO's ``prompt``/``completion``/``label``) of the
    recipe's training sources or held-out file, with the recipe's column names mapped: trl tokenizes them itself."""
    from qlora_kit.data import preference as pref_data
    from qlora_kit.data.sources import BadRows

    sources = recipe.data.train if split == "train" else [recipe.data.eval]
    labels = [f"data.train.{i}" for i in range(len(sources))] if split == "train" else ["data.eval"]
    bad, stats = BadRows(recipe.data.max_bad_rows), pref_data.PreferenceStats()
    return [
        row.data
        for source, label in zip(sources, labels, strict=True)
        for row in pref_data.read_rows(source, label, recipe, bad, stats)
    ]


def preference_trainer(recipe, training: dict[str, Any], workdir: Path, eval_rows: list[dict] | None = None):
    """trl's trainer for ``recipe.method`` with trl's defaults. A fresh LoRA goes in as ``peft_config`` (the
    reference is then the adapter-disabled base); ``model.adapter`` is loaded trainable with peft, and trl keeps its
    frozen copy as the reference, as it documents."""
    import datasets

    from qlora_kit.recipe import config_class
    from qlora_kit.resolve import resolve

    resolved = resolve(recipe)
    tokenizer = plain_tokenizer(recipe)
    model, peft_config = plain_model(recipe, resolved), lora_config(recipe)
    if recipe.model.adapter is not None:
        from peft import PeftModel

        from qlora_kit.preference import adapter_folder

        model = PeftModel.from_pretrained(model, str(adapter_folder(recipe.model.adapter)), is_trainable=True)
        peft_config = None
    args = config_args(recipe, resolved, training)
    if eval_rows is None:
        args["eval_strategy"] = "no"
    config = config_class(recipe.method)(output_dir=str(workdir), **args)
    return trainer_class(recipe.method)(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(preference_rows(recipe)),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
