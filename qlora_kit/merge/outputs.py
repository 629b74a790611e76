"""Everything beside the weights that a deployment needs: config, tokenizer, generation config, model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from qlora_kit.recipe import Recipe, resolved_dict, to_yaml
from qlora_kit.tokenizer import end_of_turn_ids


def write_config(config, folder: Path, dtype: torch.dtype, vocab_rows: int, tied: bool, tokenizer) -> None:
    """The base config with the merged dtype, vocabulary size and tying, and no quantization_config."""
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.vocab_size = vocab_rows
    config.tie_word_embeddings = tied
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    config.save_pretrained(folder)


# SentencePiece vocabularies llama.cpp's converters read (Phi-3, Gemma and Llama-2 style checkpoints ship one);
# transformers 5 saves a tokenizer as tokenizer.json only, so the file is carried over from where the tokenizer came.
SENTENCEPIECE_FILES = ("tokenizer.model",)


def copy_sentencepiece_model(tokenizer_folder: Path, folder: Path) -> list[str]:
    """Copy the tokenizer's SentencePiece model beside the merged weights when the source has one; returns the names
    copied. LoRA leaves the vocabulary alone, so the base's file still describes the merged model's tokens."""
    import shutil

    copied = []
    for name in SENTENCEPIECE_FILES:
        if (tokenizer_folder / name).is_file() and not (folder / name).exists():
            shutil.copyfile(tokenizer_folder / name, folder / name)
            copied.append(name)
    return copied


def write_generation_config(base_folder: Path, config, folder: Path, tokenizer) -> list[int]:
    """The base's generation config, stopping at EOS and at the chat template's end-of-turn token."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(base_folder)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    stops = end_of_turn_ids(tokenizer)
    generation.eos_token_id = stops if len(stops) > 1 else stops[0] if stops else None
    generation.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    generation.save_pretrained(folder)
    return stops


def _verification_lines(verification: dict[str, Any] | None) -> list[str]:
    if verification is None:
        return ["Not verified (merge.verify was false)."]
    lines = [
        f"Merged model vs the adapter on the 4-bit base, on {verification['examples']} {verification['source']} "
        "examples:",
        "",
        "| measure | value | threshold |",
        "|---|---|---|",
        f"| max abs logit difference | {verification['max_abs_logit_diff']:.3g} | "
        f"{verification['thresholds']['max_abs_logit_diff']:g} |",
        f"| mean abs logit difference | {verification['mean_abs_logit_diff']:.3g} | "
        f"{verification['thresholds']['mean_abs_logit_diff']:g} |",
        f"| held-out loss, adapter | {verification['loss_adapter']:.4f} | |",
        f"| held-out loss, merged | {verification['loss_merged']:.4f} | "
        f"±{verification['thresholds']['max_loss_diff']:g} |",
    ]
    if verification["generation_agreement"] is not None:
        lines.append(
            f"| identical greedy generations | {verification['generation_agreement']:.0%} | "
            f"≥ {verification['thresholds']['min_generation_agreement']:.0%} |"
        )
    status = "passed" if verification["passed"] else "exceeded: " + "; ".join(verification["failures"])
    lines += ["", f"Thresholds {status}" + ("" if verification["enforced"] else " (reported, not enforced)") + "."]
    return lines


def model_card(recipe: Recipe, report: dict[str, Any]) -> str:
    """README.md: what was merged, how, how it compares with the trained model, the recipe, how to load it."""
    adapters = "\n".join(f"- `{a['path']}` × {a['weight']:g}" for a in report["adapters"])
    strategy = {
        "dequantized": "the NF4/FP4 base weights the adapter was trained against, dequantized, plus the LoRA update "
        "(reproduces the trained model)",
        "original": "the full-precision base checkpoint plus the LoRA update (differs from the trained model by the "
        "4-bit quantization error of the base)",
    }[report["strategy"]]
    front = {
        "base_model": recipe.model.name_or_path,
        "library_name": "transformers",
        "tags": ["qlora-kit", "merged", report["strategy"]],
    }
    return "\n".join(
        [
            "---",
            yaml.safe_dump(front, sort_keys=False).rstrip(),
            "---",
            "",
            f"# Merged model: {recipe.model.name_or_path} + LoRA",
            "",
            "A plain transformers model: no peft or bitsandbytes needed to load it.",
            "",
            "## Merge",
            "",
            f"- base: `{recipe.model.name_or_path}`"
            + (f" (revision `{recipe.model.revision}`)" if recipe.model.revision else ""),
            f"- strategy: `{report['strategy']}`: {strategy}",
            f"- dtype: `{report['dtype']}`, merged on `{report['device']}`",
            f"- adapters:\n{adapters}",
            *[f"- note: {note}" for note in report["notes"]],
            "",
            "## Verification",
            "",
            *_verification_lines(report["verification"]),
            "",
            "## Use",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")  # with the chat template used in training',
            "```",
            "",
            f"generation_config.json stops at token ids {report['eos_token_ids']} (EOS and end of turn).",
            "",
            "## Recipe",
            "",
            "```yaml",
            to_yaml(resolved_dict(recipe)).rstrip(),
            "```",
            "",
        ]
    )
