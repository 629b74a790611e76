"""Held-out loss on the trained tokens and batched generation, for base, tuned and merged models alike."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from qlora_kit.data import IGNORE_INDEX, adds_bos

Advance = Callable[[int], None]  # told how many items a batch finished, for progress bars


@dataclass
class GenerationSettings:
    """How answers are generated; the recipe's ``eval`` section fills it (greedy unless do_sample)."""

    max_new_tokens: int = 48
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int = 42

    @classmethod
    def from_recipe(cls, section) -> GenerationSettings:
        return cls(**{name: getattr(section, name) for name in cls.__dataclass_fields__})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sampling_kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def heldout_loss(
    model,
    dataset,
    pad_token_id: int,
    batch_size: int = 8,
    max_examples: int | None = None,
    advance: Advance | None = None,
) -> float:
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
            logits[:, :-1].reshape(-1, logits.size(-1)),
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += losses.item()
        count += int((shifted != IGNORE_INDEX).sum())
        if advance:
            advance(len(batch))
    return total / max(count, 1)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts, encoded as training encoded them: no special tokens but one BOS if the model
    was pre-trained with one."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    return [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


@torch.no_grad()
def generate_ids(
    model, tokenizer, encoded: list[list[int]], settings: GenerationSettings, advance: Advance | None = None
) -> list[list[int]]:
    """Generated token ids per prompt (stop tokens and padding removed), batched with left padding.

    Prompts are sorted by length so each batch holds similar lengths and little compute goes to padding; results
    come back in the prompts' order.
    """
    from qlora_kit.tokenizer import end_of_turn_ids

    model.eval()
    device = next(model.parameters()).device
    stops = end_of_turn_ids(tokenizer)
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: dict[int, list[int]] = {}
    for batch in _batches(order, settings.batch_size):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **settings.sampling_kwargs(),
        )
        for row, i in enumerate(batch):
            new = generated[row, width:].tolist()
            # Everything from the first stop token on is the end of the answer (or padding after it).
            cut = next((k for k, token in enumerate(new) if token in stops), len(new))
            outputs[i] = new[:cut]
        if advance:
            advance(len(batch))
    return [outputs[i] for i in range(len(encoded))]


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 8,
    settings: GenerationSettings | None = None,
    advance: Advance | None = None,
) -> list[str]:
    """Answers to rendered prompts: batched, left-padded, stopping at EOS or the template's end-of-turn token.

    Greedy unless ``settings`` asks for sampling; ``settings`` (when given) overrides max_new_tokens and batch_size.
    """
    settings = settings or GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    ids = generate_ids(model, tokenizer, encode_prompts(tokenizer, prompts), settings, advance)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!")


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / len(references)


def compare_base_and_tuned(
    peft_model, tokenizer, eval_dataset, pairs: list[tuple[str, str]], max_examples: int, max_new_tokens: int
) -> dict[str, Any]:
    """Held-out loss and greedy answers of the base (adapter disabled) and the tuned model, on the same examples."""
    report: dict[str, Any] = {"examples": 0, "samples": []}
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    outputs = {}
    for name, context in (("base", peft_model.disable_adapter), ("tuned", nullcontext)):
        with context():
            if eval_dataset is not None and len(eval_dataset):
                loss = heldout_loss(peft_model, eval_dataset, tokenizer.pad_token_id, max_examples=max_examples)
                report[f"eval_loss_{name}"] = loss
                report[f"eval_perplexity_{name}"] = perplexity(loss)
                report["examples"] = min(len(eval_dataset), max_examples)
            if prompts:
                outputs[name] = generate(peft_model, tokenizer, prompts, max_new_tokens)
                report[f"exact_match_{name}"] = exact_match(outputs[name], references)
    for i, (prompt, reference) in enumerate(pairs):
        report["samples"].append(
            {"prompt": prompt, "reference": reference, "base": outputs["base"][i], "tuned": outputs["tuned"][i]}
        )
    return report


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged model reports a large finite number instead of inf."""
    return math.exp(min(loss, 50))
