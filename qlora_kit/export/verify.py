"""Verification of each GGUF by llama.cpp itself, against the merged transformers model and the adapter.

Both sides run the same held-out examples and prompts, token ids in, one sequence at a time (no padding):
- perplexity on the trained tokens of the held-out examples (exp of the mean loss, as merge and eval compute it);
- greedy generations from the held-out prompts, compared token by token; the first divergence is reported;
- chat mode: llama.cpp's own handling of the GGUF's chat template must give the prompt tokens our renderer gives.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_kit import data as data_stage
from qlora_kit import model as model_stage
from qlora_kit.evaluate.generation import GenerationSettings, encode_prompts, generate_ids
from qlora_kit.export import llamacpp
from qlora_kit.recipe import Recipe
from qlora_kit.tokenizer import end_of_turn_ids


@dataclass
class HeldOut:
    """The examples (input ids, labels) whose perplexity is compared and the prompts whose generations are."""

    examples: list[tuple[list[int], list[int]]]
    prompts: list[str]
    source: str
    texts: list[str]  # whole held-out conversations as training rendered them, for the tokenizer check


@dataclass
class Reference:
    """What the merged model (and the adapter) did on the held-out data, computed once for every GGUF."""

    prompt_ids: list[list[int]]
    generations: list[list[int]]
    loss_merged: float
    loss_adapter: float | None
    stops: list[int]


def held_out_data(recipe: Recipe, tokenizer) -> tuple[HeldOut, list[dict] | None]:
    """The held-out examples and prompts (as merge verification reads them, in the export's numbers) and the first
    held-out conversation up to its last answer, for the chat-mode check."""
    from qlora_kit.data.formats import normalize
    from qlora_kit.merge.verify import checked_examples

    export = recipe.export
    prepared, dataset, source = checked_examples(recipe, tokenizer, "export verification", "export.verify")
    examples = list(zip(dataset["input_ids"], dataset["labels"], strict=True))[: export.verify_examples]
    rows = prepared.eval_rows or []
    prompts = [p for p, _ in data_stage.eval_prompts(rows, tokenizer, export.verify_generations)]
    conversation = None
    for row in rows:
        messages = normalize(row, row.fmt).data.get("messages")
        if messages and any(m["role"] == "assistant" for m in messages):
            conversation = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
            break
    # Rendered, not decoded from the tokens: a SentencePiece tokenizer that opens every piece with "▁" decodes to text
    # it would never render (a space after each special token), which says nothing about the texts llama.cpp sees.
    texts = [data_stage.render(row, row.fmt, tokenizer)[0] for row in rows[:4]]
    return HeldOut(examples, prompts, source, texts), conversation


def context_size(heldout: HeldOut, prompt_ids: list[list[int]], max_new_tokens: int) -> int:
    longest = max([len(ids) for ids, _ in heldout.examples] + [len(p) + max_new_tokens for p in prompt_ids] + [32])
    return 32 * math.ceil(longest / 32)


def _free(model) -> None:
    del model
    gc.collect()


@torch.no_grad()
def reference(recipe: Recipe, merged_dir: Path, adapter: Path | None, tokenizer, heldout: HeldOut) -> Reference:
    """Greedy generations and loss of the merged model in transformers; the adapter's loss on the 4-bit base."""
    from transformers import AutoModelForCausalLM

    settings = GenerationSettings(max_new_tokens=recipe.export.max_new_tokens, batch_size=1)
    prompt_ids = encode_prompts(tokenizer, heldout.prompts)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    generations = generate_ids(model, tokenizer, prompt_ids, settings) if prompt_ids else []
    loss_merged = transformers_loss(model, heldout.examples)
    _free(model)
    loss_adapter = None
    if adapter is not None:
        model = model_stage.load_adapter_model(recipe, adapter, tokenizer)
        loss_adapter = transformers_loss(model, heldout.examples)
        _free(model)
    stops = end_of_turn_ids(tokenizer)
    return Reference(prompt_ids, generations, loss_merged, loss_adapter, stops)


@torch.no_grad()
def transformers_loss(model, examples: list[tuple[list[int], list[int]]]) -> float:
    """Mean negative log-likelihood of the trained tokens, one unpadded sequence at a time (as llama_loss)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, labels in examples:
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
        targets = torch.tensor(labels[1:], device=device)
        loss = torch.nn.functional.cross_entropy(
            logits, targets, ignore_index=data_stage.IGNORE_INDEX, reduction="sum"
        )
        total += loss.item()
        count += int((targets != data_stage.IGNORE_INDEX).sum())
    return total / max(count, 1)


def llama_loss(model, examples: list[tuple[list[int], list[int]]]) -> float:
    """Mean negative log-likelihood of the trained tokens, from llama.cpp's logits at every position."""
    total, count = 0.0, 0
    for ids, labels in examples:
        model.reset()
        model.eval(ids)
        logits = np.asarray(model.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        for position, target in enumerate(labels[1:]):
            if target != data_stage.IGNORE_INDEX:
                total -= log_probs[position, target]
                count += 1
    return total / max(count, 1)


def llama_greedy(model, prompt: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
    """Greedy decoding in llama.cpp from token ids, stopping at (and dropping) an end-of-turn token."""
    model.reset()
    model.eval(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        if token in stops:
            break
        out.append(token)
        model.eval([token])
    return out


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when identical."""
    if ours == theirs:
        return None
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))


def check_gguf(path: Path, ref: Reference, heldout: HeldOut, tokenizer, max_new: int, threads: int, lora=None) -> dict:
    """Perplexity and greedy generations of one GGUF in llama.cpp, next to the merged model's."""
    model = llamacpp.load(path, context_size(heldout, ref.prompt_ids, max_new), threads, lora=lora)
    try:
        loss = llama_loss(model, heldout.examples)
        generations = []
        for prompt, ids, expected in zip(heldout.prompts, ref.prompt_ids, ref.generations, strict=True):
            got = llama_greedy(model, ids, max_new, ref.stops)
            divergence = first_divergence(expected, got)
            row: dict[str, Any] = {"prompt": prompt, "merged": tokenizer.decode(expected), "agree": divergence is None}
            row["gguf"] = tokenizer.decode(got)
            if divergence is not None:
                row["first_divergence"] = {
                    "token": divergence,
                    "merged": tokenizer.decode(expected[divergence : divergence + 1]),
                    "gguf": tokenizer.decode(got[divergence : divergence + 1]),
                }
            generations.append(row)
    finally:
        model.close()
    agreement = sum(g["agree"] for g in generations) / len(generations) if generations else None
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "perplexity_increase": math.exp(loss - ref.loss_merged) - 1,
        "generation_agreement": agreement,
        "generations": generations,
    }


def check_chat_template(path: Path, tokenizer, conversation: list[dict]) -> dict[str, Any]:
    """Prompt tokens from llama.cpp's chat mode (the GGUF's template, as Llama.create_chat_completion renders and
    tokenizes it) against our renderer's, for one held-out conversation up to its last answer."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ours = encode_prompts(tokenizer, [text])[0]
    model = llamacpp.load(path, context=64, threads=1, vocab_only=True)
    try:
        template = model.metadata.get("tokenizer.chat_template")
        if template is None:
            return {"checked": False, "identical": False, "why": "the GGUF has no tokenizer.chat_template"}
        eos, bos = model.token_eos(), model.token_bos()
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model._model.token_get_text(eos) if eos != -1 else "",
            bos_token=model._model.token_get_text(bos) if bos != -1 else "",
        )
        rendered = formatter(messages=conversation)
        theirs = list(model.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True))
    finally:
        model.close()
    return {
        "checked": True,
        "identical": theirs == ours,
        "tokens": len(ours),
        "first_divergence": first_divergence(ours, theirs),
    }
