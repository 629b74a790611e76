"""Evaluation: held-out loss on the trained tokens and greedy generations, for base and tuned models alike."""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from typing import Any

import torch

from qlora_kit.data import IGNORE_INDEX, adds_bos


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def heldout_loss(model, dataset, pad_token_id: int, batch_size: int = 8, max_examples: int | None = None) -> float:
    """Mean cross-entropy per trained token (labels != -100), summed over all examples before dividing.

    Per-batch means would weight short examples more; summing token losses gives the loss the data defines.
    """
    model.eval()
    rows = list(zip(dataset["input_ids"], dataset["labels"], strict=True))[:max_examples]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in _batches(rows, batch_size):
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(batch):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            labels[i, : len(row_labels)] = torch.tensor(row_labels)
            mask[i, : len(row_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += losses.item()
        count += int((shifted != IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 8) -> list[str]:
    """Greedy, batched generation with left padding; stops at EOS or the template's end-of-turn token."""
    from qlora_kit.model import end_of_turn_ids

    model.eval()
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # Sorting by length keeps padding, and so wasted compute, small inside each batch.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: dict[int, str] = {}
    for batch in _batches(order, batch_size):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_of_turn_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return [outputs[i] for i in range(len(prompts))]


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!")


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / len(references)


def compare_base_and_tuned(peft_model, tokenizer, eval_dataset, pairs: list[tuple[str, str]], max_examples: int,
                           max_new_tokens: int) -> dict[str, Any]:
    """Held-out loss and greedy answers of the base (adapter disabled) and the tuned model, on the same examples."""
    report: dict[str, Any] = {"examples": 0, "samples": []}
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    outputs = {}
    for name, context in (("base", peft_model.disable_adapter), ("tuned", nullcontext)):
        with context():
            if eval_dataset is not None and len(eval_dataset):
                loss = heldout_loss(peft_model, eval_dataset, tokenizer.pad_token_id, max_examples=max_examples)
                report[f"eval_loss_{name}"] = loss
                report[f"eval_perplexity_{name}"] = math.exp(min(loss, 50))
                report["examples"] = min(len(eval_dataset), max_examples)
            if prompts:
                outputs[name] = generate(peft_model, tokenizer, prompts, max_new_tokens)
                report[f"exact_match_{name}"] = exact_match(outputs[name], references)
    for i, (prompt, reference) in enumerate(pairs):
        report["samples"].append(
            {"prompt": prompt, "reference": reference, "base": outputs["base"][i], "tuned": outputs["tuned"][i]}
        )
    return report
