"""Builds the project's own tiny, genuinely pre-trained demo causal LM and its chat fine-tuning dataset.

Nothing can be downloaded, so the demo and the tests use a model that this module builds from scratch:

1. A synthetic pre-training corpus of templated sentences stating simple facts (small-number addition, the number
   after ``n``, antonyms, plurals, capitals of fictional countries, word reversal), filler sentences, and FAQ
   documents ("question" line, then "answer" line) about the same facts.
2. A byte-level BPE tokenizer trained on that corpus (digits are always single tokens so arithmetic stays learnable),
   with ChatML special tokens and a ChatML chat template.
3. A ~1.9M parameter ``LlamaForCausalLM`` pre-trained on the corpus with a plain, deterministic torch loop.
4. A chat dataset (``train.jsonl`` / ``eval.jsonl``) asking the *same* facts in chat form. Train and eval are split
   by fact, so eval facts are never seen during fine-tuning: answering them needs knowledge from pre-training, while
   fine-tuning only has to teach the chat format (the base model has never seen ``<|im_start|>``/``<|im_end|>``).

Run ``python -m qlora_kit.demo_model --output models/demo-base --data-dir data/demo`` to rebuild the artifacts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Order fixes the ids: <|endoftext|>=0, <|pad|>=1, <|im_start|>=2, <|im_end|>=3.
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN]
# Special tokens that never occur in the pre-training corpus (their weights get no useful signal there).
UNSEEN_TOKENS = [PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN]

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEFAULT_SEED = 0
DEFAULT_VOCAB_SIZE = 768
DEFAULT_NUM_DOCS = 60_000
DEFAULT_STEPS = 800
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEQ_LEN = 128
DEFAULT_LR = 3e-3
EVAL_FRACTION = 0.12
BUILD_COMMAND = "python -m qlora_kit.demo_model --output models/demo-base --data-dir data/demo"


class Fact(NamedTuple):
    """One deterministic fact the model can learn, e.g. ``12 + 7 -> 19``.

    Attributes:
        skill: Skill name, a key of ``CORPUS_TEMPLATES`` and ``CHAT_TEMPLATES``.
        fields: Template fields describing the question (e.g. ``{"a": 12, "b": 7}``).
        answer: The exact expected answer string.
    """

    skill: str
    fields: dict[str, Any]
    answer: str


# --- Fixed fact tables. They never depend on the seed so that the corpus and the task dataset always agree. ---
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("long", "short"),
    ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("loud", "quiet"), ("thick", "thin"), ("clean", "dirty"),
    ("near", "far"), ("push", "pull"), ("win", "lose"), ("left", "right"), ("day", "night"), ("in", "out"),
    ("yes", "no"), ("good", "bad"), ("first", "last"), ("young", "old"), ("sweet", "sour"), ("above", "below"),
]  # fmt: skip
PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("bus", "buses"), ("fox", "foxes"), ("baby", "babies"),
    ("city", "cities"), ("party", "parties"), ("story", "stories"), ("leaf", "leaves"), ("wolf", "wolves"),
    ("knife", "knives"), ("wife", "wives"), ("half", "halves"), ("man", "men"), ("woman", "women"),
    ("child", "children"), ("mouse", "mice"), ("goose", "geese"), ("tooth", "teeth"), ("foot", "feet"),
    ("person", "people"), ("ox", "oxen"), ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"),
    ("church", "churches"), ("dish", "dishes"), ("glass", "glasses"), ("watch", "watches"), ("hero", "heroes"),
    ("potato", "potatoes"), ("tomato", "tomatoes"), ("key", "keys"), ("day", "days"), ("toy", "toys"),
    ("book", "books"), ("tree", "trees"), ("star", "stars"), ("house", "houses"),
]  # fmt: skip
CAPITALS = [
    ("Vorland", "Mirth"), ("Zandia", "Kelport"), ("Elbaro", "Tusk"), ("Quarnia", "Lindale"), ("Ostavia", "Brel"),
    ("Pellan", "Corvin"), ("Drustia", "Amberly"), ("Kivonia", "Solt"), ("Marrowen", "Fennick"),
    ("Tulgaria", "Ossery"), ("Brindle", "Havel"), ("Corsova", "Ruen"), ("Felmark", "Tobin"), ("Grenhal", "Ystra"),
    ("Hollin", "Dapple"), ("Istria", "Carrow"), ("Jorvale", "Pimm"), ("Lustran", "Eddery"), ("Norvia", "Quell"),
    ("Pardovia", "Wren"), ("Rellis", "Gantry"), ("Sombria", "Ulm"), ("Tazmir", "Orrin"), ("Umbrel", "Nash"),
    ("Valdora", "Kestrel"), ("Wexia", "Morrow"), ("Yarrow", "Bettin"), ("Zelmont", "Frisk"), ("Aldovar", "Leith"),
    ("Caskadia", "Veen"),
]  # fmt: skip
REVERSAL_WORDS = [
    "cat", "dog", "sun", "map", "cup", "pen", "box", "red", "top", "bag", "hat", "fox", "owl", "bus", "car",
    "leaf", "star", "moon", "fish", "ship", "frog", "lamp", "book", "door", "tree", "milk", "rain", "snow", "wind",
    "gold", "desk", "ring", "bell", "coin", "drum", "kite", "nest", "rock", "seed", "wave", "apple", "bread",
    "chair", "cloud", "grass", "house", "light", "stone", "water", "plant",
]  # fmt: skip
ADDITION_MAX = 19  # operands 0..19: 400 facts, sums 0..38
SUCCESSOR_MAX = 98  # "the number after n" for n in 0..98

CHAT_TEMPLATES: dict[str, list[str]] = {
    "addition": ["What is {a} + {b}?", "Compute {a} plus {b}.", "What is the sum of {a} and {b}?", "Add {a} and {b}."],
    "successor": ["What number comes after {n}?", "What is the next number after {n}?"],
    "antonym": ["What is the opposite of {w}?", "Give the opposite of the word {w}."],
    "plural": ["What is the plural of {w}?", "Give the plural form of {w}."],
    "capital": ["What is the capital of {c}?", "Name the capital city of {c}."],
    "reverse": ["Reverse the word {w}.", "What is {w} spelled backwards?"],
}
# Statements of the facts. The corpus also has FAQ documents ("question\nanswer" lines, using the chat phrasings): like
# web FAQs, they teach the base model to answer a question, while the chat format (ChatML tokens, stopping with
# <|im_end|>) is left for fine-tuning.
CORPUS_TEMPLATES: dict[str, list[str]] = {
    "addition": ["{a} plus {b} is {ans}.", "{a} + {b} = {ans}.", "The sum of {a} and {b} is {ans}.",
                 "Adding {a} and {b} gives {ans}."],
    "successor": ["The number after {n} is {ans}.", "After {n} comes {ans}.", "{n} is followed by {ans}."],
    "antonym": ["The opposite of {w} is {ans}.", "{ans} is the opposite of {w}."],
    "plural": ["The plural of {w} is {ans}.", "One {w}, two {ans}."],
    "capital": ["The capital of {c} is {ans}.", "{ans} is the capital city of {c}."],
    "reverse": ["The reverse of {w} is {ans}.", "Spelled backwards, {w} is {ans}."],
}  # fmt: skip
FAQ_FRACTION = 0.35  # share of corpus documents that are FAQs
TERSE_SYSTEM_PROMPT = "Answer with just the answer."
SYSTEM_PROMPTS = ["You are a helpful assistant.", TERSE_SYSTEM_PROMPT, "You are a concise assistant."]

# Filler vocabulary: plain sentences so the model also sees some ordinary language.
_FILLER_ADJECTIVES = ["big", "small", "old", "happy", "quiet", "red", "green", "tall", "brave", "tired"]
_FILLER_NOUNS = ["cat", "dog", "bird", "farmer", "child", "teacher", "boat", "horse", "king", "baker"]
_FILLER_VERBS = ["sees", "likes", "helps", "follows", "finds", "calls", "watches", "visits"]
_FILLER_PLACES = ["river", "market", "forest", "school", "hill", "village", "garden", "harbor"]
_FILLER_TEMPLATES = [
    "The {adj} {noun} {verb} the {noun2}.",
    "A {noun} lives near the {place}.",
    "Every morning the {adj} {noun} walks to the {place}.",
    "The {noun2} and the {noun} sing by the {place}.",
]


def all_facts() -> list[Fact]:
    """Returns every fact of every skill, in a fixed order.

    Returns:
        The complete, seed-independent list of facts shared by the corpus and the task dataset.
    """
    facts = [
        Fact("addition", {"a": a, "b": b}, str(a + b))
        for a in range(ADDITION_MAX + 1)
        for b in range(ADDITION_MAX + 1)
    ]
    facts += [Fact("successor", {"n": n}, str(n + 1)) for n in range(SUCCESSOR_MAX + 1)]
    # Both directions of each antonym pair are facts.
    facts += [Fact("antonym", {"w": x}, y) for pair in ANTONYMS for x, y in (pair, pair[::-1])]
    facts += [Fact("plural", {"w": w}, p) for w, p in PLURALS]
    facts += [Fact("capital", {"c": c}, cap) for c, cap in CAPITALS]
    facts += [Fact("reverse", {"w": w}, w[::-1]) for w in REVERSAL_WORDS]
    return facts


def _render(template: str, fact: Fact) -> str:
    """Fills a template with a fact's fields and answer, capitalising the first letter like a sentence."""
    text = template.format(ans=fact.answer, **fact.fields)
    return text[0].upper() + text[1:]


def _filler_sentence(rng: random.Random) -> str:
    """Returns one random filler sentence."""
    template = rng.choice(_FILLER_TEMPLATES)
    nouns = rng.sample(_FILLER_NOUNS, 2)
    return template.format(
        adj=rng.choice(_FILLER_ADJECTIVES),
        noun=nouns[0],
        noun2=nouns[1],
        verb=rng.choice(_FILLER_VERBS),
        place=rng.choice(_FILLER_PLACES),
    )


def _statement_document(rng: random.Random, facts: Sequence[Fact]) -> str:
    """Builds a document of 3-8 sentences: fact statements with some filler."""
    sentences = []
    for _ in range(rng.randint(3, 8)):
        if rng.random() < 0.15:
            sentences.append(_filler_sentence(rng))
        else:
            fact = rng.choice(facts)
            sentences.append(_render(rng.choice(CORPUS_TEMPLATES[fact.skill]), fact))
    return rng.choice([" ", "\n"]).join(sentences)


def _faq_document(rng: random.Random, facts: Sequence[Fact]) -> str:
    """Builds an FAQ document of 3-8 question lines, each followed by a line with just the answer."""
    lines = []
    for _ in range(rng.randint(3, 8)):
        fact = rng.choice(facts)
        lines.append(_render(rng.choice(CHAT_TEMPLATES[fact.skill]), fact) + "\n" + fact.answer)
    return "\n".join(lines)


def _make_document(rng: random.Random, facts: Sequence[Fact]) -> str:
    """Builds one corpus document, an FAQ or statements. Facts are sampled uniformly for even exposure."""
    if rng.random() < FAQ_FRACTION:
        return _faq_document(rng, facts)
    return _statement_document(rng, facts)


def generate_corpus(seed: int = DEFAULT_SEED, num_docs: int = DEFAULT_NUM_DOCS) -> list[str]:
    """Generates the synthetic pre-training corpus.

    Args:
        seed: Seed of the ``random.Random`` that samples the documents.
        num_docs: Number of documents.

    Returns:
        The documents, without separators (``<|endoftext|>`` is appended when tokenizing).
    """
    rng = random.Random(seed)
    facts = all_facts()
    return [_make_document(rng, facts) for _ in range(num_docs)]


def _chat_row(rng: random.Random, fact: Fact) -> dict[str, list[dict[str, str]]]:
    """Turns a fact into a chat row, sometimes with a system message."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": _render(rng.choice(CHAT_TEMPLATES[fact.skill]), fact)})
    messages.append({"role": "assistant", "content": fact.answer})
    return {"messages": messages}


def generate_task_rows(seed: int = DEFAULT_SEED) -> tuple[list[dict], list[dict]]:
    """Generates the chat fine-tuning dataset, split by fact into train and eval.

    The split is stratified per skill and by *fact*, so no eval question (in any phrasing) appears in train: a model
    can only answer eval rows with knowledge it got from pre-training.

    Args:
        seed: Seed of the ``random.Random`` that splits the facts and picks the phrasings.

    Returns:
        ``(train_rows, eval_rows)``, each row being ``{"messages": [...]}``.
    """
    (train_facts, train_rows), (eval_facts, eval_rows) = task_split(seed)
    return train_rows, eval_rows


def task_split(seed: int = DEFAULT_SEED) -> tuple[tuple[list[Fact], list[dict]], tuple[list[Fact], list[dict]]]:
    """The chat task's ``(facts, rows)`` for train and for eval, each row the chat row of the fact beside it."""
    rng = random.Random(seed)
    train_facts: list[Fact] = []
    eval_facts: list[Fact] = []
    facts = all_facts()
    for skill in CORPUS_TEMPLATES:
        skill_facts = [fact for fact in facts if fact.skill == skill]
        rng.shuffle(skill_facts)
        num_eval = max(2, round(len(skill_facts) * EVAL_FRACTION))
        eval_facts += skill_facts[:num_eval]
        train_facts += skill_facts[num_eval:]
    rng.shuffle(train_facts)
    rng.shuffle(eval_facts)
    train_rows = [_chat_row(rng, fact) for fact in train_facts]
    return (train_facts, train_rows), (eval_facts, [_chat_row(rng, fact) for fact in eval_facts])


def build_tokenizer(corpus: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on the corpus and wraps it with ChatML tokens and template.

    Args:
        corpus: Training texts.
        vocab_size: Vocabulary size, special tokens included.

    Returns:
        A fast tokenizer with eos/bos ``<|endoftext|>``, pad ``<|pad|>``, ``<|im_start|>``/``<|im_end|>`` and the
        ChatML chat template. It adds no bos token automatically (like GPT-2/Qwen).
    """
    backend = Tokenizer(models.BPE())
    # Digits are split individually before byte-level splitting so that numbers are sequences of digit tokens.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        model_max_length=512,
        padding_side="right",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> LlamaConfig:
    """Returns the demo model architecture (~1.9M parameters, untied embeddings).

    Every Linear layer has in/out dims that are multiples of 64 so that bitsandbytes 4-bit blocks fit (head dim is
    ``hidden_size // num_attention_heads`` = 32).

    Args:
        tokenizer: Tokenizer providing vocabulary size and special token ids.
        **overrides: Any ``LlamaConfig`` field to override (e.g. ``num_hidden_layers=2`` for faster tests).

    Returns:
        The model configuration.
    """
    kwargs: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _pack_blocks(tokenizer: PreTrainedTokenizerFast, corpus: Sequence[str], seq_len: int) -> torch.Tensor:
    """Tokenizes the corpus, joins documents with ``<|endoftext|>`` and cuts it into ``seq_len`` blocks."""
    ids: list[int] = []
    for encoding in tokenizer(list(corpus), add_special_tokens=False)["input_ids"]:
        ids.extend(encoding)
        ids.append(tokenizer.eos_token_id)
    num_blocks = len(ids) // seq_len
    return torch.tensor(ids[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


def _batches(blocks: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Yields ``steps`` batches of blocks, reshuffling (seeded) at every epoch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(blocks), generator=generator), 0
        yield blocks[order[position : position + batch_size]]
        position += batch_size


def _lr_lambda(steps: int, warmup: int) -> Any:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule


def _make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm weights are not decayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def pretrain(
    model: LlamaForCausalLM,
    blocks: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = DEFAULT_SEED,
) -> list[float]:
    """Pre-trains the model on packed token blocks with a plain AdamW + cosine loop.

    Args:
        model: Freshly initialised model (float32).
        blocks: ``(num_blocks, seq_len)`` token ids from ``_pack_blocks``.
        steps: Optimizer steps.
        batch_size: Blocks per step.
        lr: Peak learning rate.
        seed: Seed of the batch order.

    Returns:
        The training loss of every step.
    """
    model.train()
    optimizer = _make_optimizer(model, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, warmup=max(1, steps // 20)))
    losses: list[float] = []
    progress = tqdm(_batches(blocks, batch_size, steps, seed), total=steps, desc="pre-training", mininterval=2.0)
    for step, batch in enumerate(progress):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % 100 == 0 or step + 1 == steps:
            tqdm.write(f"step {step + 1}/{steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    model.eval()
    return losses


@torch.no_grad()
def init_unseen_token_rows(model: LlamaForCausalLM, token_ids: Sequence[int], seed: int = DEFAULT_SEED) -> None:
    """Re-initialises the embedding and lm_head rows of tokens that never occurred during pre-training.

    Pre-training leaves such rows at their tiny random initialisation (inputs) or pushes them to ever lower logits
    (outputs), which makes ``<|im_start|>``/``<|im_end|>`` out-of-distribution and ``<|im_end|>`` nearly impossible to
    emit; LoRA does not train embeddings or ``lm_head``, so it could hardly fix that. Sampling the rows from a
    Gaussian fitted to the learned rows makes them look like ordinary tokens. (Plain mean initialisation would not
    do: the mean row's logit is the average logit, so it could never become the argmax.)

    Args:
        model: Pre-trained model, modified in place.
        token_ids: Ids of the unseen tokens.
        seed: Seed of the sampling.
    """
    generator = torch.Generator().manual_seed(seed)
    for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = embedding.weight
        seen = torch.ones(weight.shape[0], dtype=torch.bool)
        seen[list(token_ids)] = False
        mean, std = weight[seen].mean(dim=0), weight[seen].std(dim=0)
        noise = torch.randn((len(token_ids), weight.shape[1]), generator=generator)
        weight[list(token_ids)] = mean + std * noise


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy generation that stops at ``<|endoftext|>`` or ``<|im_end|>``."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END_TOKEN)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )


def write_jsonl(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Writes rows as JSON lines (stable key order, UTF-8, ``\\n`` endings) so the output is byte-reproducible.

    Args:
        rows: JSON-serialisable rows.
        path: Destination file; parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _model_card(model: LlamaForCausalLM, stats: dict[str, Any]) -> str:
    """Renders the README.md model card of the demo base model."""
    config = model.config
    num_params = sum(p.numel() for p in model.parameters())
    return f"""# demo-base

A tiny Llama-architecture causal LM ({num_params / 1e6:.2f}M parameters) **pre-trained from scratch** by
`qlora_kit/demo_model.py`, so that the qlora-kit demo and tests fine-tune a real pre-trained model without
downloading anything.

## Architecture

`LlamaForCausalLM`: hidden size {config.hidden_size}, {config.num_hidden_layers} layers, \
{config.num_attention_heads} attention heads / {config.num_key_value_heads} KV heads (head dim {config.head_dim}), \
intermediate size {config.intermediate_size}, vocabulary {config.vocab_size}, untied input/output embeddings, float32.
Every Linear in/out dim is a multiple of 64, so bitsandbytes 4-bit (NF4) quantization works.

## Tokenizer

Byte-level BPE trained on the corpus; digits are always single tokens. `<|endoftext|>` is bos and eos, `<|pad|>` is
a distinct pad token, `<|im_start|>`/`<|im_end|>` delimit ChatML turns. No bos is added automatically. The chat
template is plain ChatML; generation stops at `<|endoftext|>` or `<|im_end|>`.

## Pre-training

- Data: a synthetic corpus ({stats["num_docs"]} documents, {stats["num_tokens"]} tokens, seed {stats["seed"]}) of
  templated sentences stating small-number addition (0-{ADDITION_MAX} + 0-{ADDITION_MAX}), the number after n
  (0-{SUCCESSOR_MAX}), antonyms, plurals, capitals of fictional countries and word reversals; filler sentences; and
  FAQ documents (a question line, then a line with just the answer) about the same facts.
- Training: {stats["steps"]} AdamW steps of {stats["batch_size"]} x {stats["seq_len"]} tokens, peak learning rate \
{stats["lr"]}, cosine schedule, final loss {stats["final_loss"]:.3f}.
- The chat special tokens never occur in pre-training. Their embedding and lm_head rows are re-initialised from a
  Gaussian fitted to the learned rows, so that they look like ordinary tokens and LoRA can learn to emit `<|im_end|>`.

## Intended use

The base model knows the facts but not the chat format: on the held-out chat questions of `data/demo/eval.jsonl` it
(almost) never answers exactly. A short QLoRA fine-tune on `data/demo/train.jsonl` (train and eval facts are disjoint)
teaches the format, and the held-out exact match then comes from knowledge acquired in pre-training. It is a toy:
use it for demos and tests only.

## Rebuilding

Deterministic, a few minutes on 2 CPU cores:

```bash
{BUILD_COMMAND}
```
"""


def _set_determinism(seed: int, num_threads: int) -> None:
    """Seeds torch and makes CPU kernels deterministic so that rebuilding gives the same weights."""
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def write_task_dataset(data_dir: str | os.PathLike, seed: int = DEFAULT_SEED) -> tuple[list[dict], list[dict]]:
    """Writes ``train.jsonl`` and ``eval.jsonl`` of the chat task into ``data_dir``.

    Args:
        data_dir: Destination directory.
        seed: Seed passed to ``generate_task_rows``.

    Returns:
        ``(train_rows, eval_rows)``.
    """
    train_rows, eval_rows = generate_task_rows(seed)
    write_jsonl(train_rows, Path(data_dir) / "train.jsonl")
    write_jsonl(eval_rows, Path(data_dir) / "eval.jsonl")
    return train_rows, eval_rows


def _wrong_number(rng: random.Random, answer: str) -> str:
    """A near miss: the right number moved by 1 or 2, never negative (the mistakes a small model actually makes)."""
    value = int(answer)
    return str(rng.choice([v for v in (value - 2, value - 1, value + 1, value + 2) if v >= 0]))


def _wrong_answer(rng: random.Random, fact: Fact) -> str:
    """A wrong answer of the right kind: a near miss for a number, another answer of the same skill for a word."""
    if fact.answer.isdigit():
        return _wrong_number(rng, fact.answer)
    others = sorted({f.answer for f in all_facts() if f.skill == fact.skill and f.answer != fact.answer})
    return rng.choice(others)


# The answer the preference data prefers: the fact's answer in a sentence that says it is one.
ANSWER_SENTENCE = "{ans} is the answer."
STYLE_SHARE = 0.5  # share of pairs rejecting the right answer, bare; the others reject a wrong bare answer


def preference_rows(facts: Sequence[Fact], rows: Sequence[dict], seed: int = DEFAULT_SEED) -> list[dict]:
    """Preference pairs that teach what the chat data does not: answer in a full, correct sentence.

    Chosen is the right answer in a sentence ("22 is the answer."). Rejected is a bare answer: half of the time the
    right one, as the chat data (and so the SFT model) gives it ("22"), otherwise a wrong one (a near miss for a
    number, another answer of the same skill for a word).
    """
    rng = random.Random(seed)
    pairs = []
    for fact, row in zip(facts, rows, strict=True):
        *prompt, _ = row["messages"]
        prompt = [m for m in prompt if m["content"] != TERSE_SYSTEM_PROMPT]  # it asks for the bare answer
        rejected = fact.answer if rng.random() < STYLE_SHARE else _wrong_answer(rng, fact)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": ANSWER_SENTENCE.format(ans=fact.answer)}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return pairs


def write_preference_dataset(data_dir: str | os.PathLike, seed: int = DEFAULT_SEED) -> tuple[list[dict], list[dict]]:
    """Writes ``preference_train.jsonl`` and ``preference_eval.jsonl``: pairs on the same fact split as the chat task,
    so no held-out question is trained on."""
    (train_facts, train_rows), (eval_facts, eval_rows) = task_split(seed)
    train_pairs = preference_rows(train_facts, train_rows, seed)
    eval_pairs = preference_rows(eval_facts, eval_rows, seed + 1)
    write_jsonl(train_pairs, Path(data_dir) / "preference_train.jsonl")
    write_jsonl(eval_pairs, Path(data_dir) / "preference_eval.jsonl")
    return train_pairs, eval_pairs


def build_model(
    output_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    seed: int = DEFAULT_SEED,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    lr: float = DEFAULT_LR,
    num_docs: int = DEFAULT_NUM_DOCS,
    num_threads: int = 2,
) -> LlamaForCausalLM:
    """Builds the whole demo: corpus, tokenizer, pre-trained model (saved to ``output_dir``) and task dataset.

    Args:
        output_dir: Where the model, tokenizer, generation config and README.md are saved.
        data_dir: Where ``train.jsonl``/``eval.jsonl`` are written; ``None`` skips the dataset.
        seed: Seed of everything (corpus, split, weights, batch order).
        steps: Pre-training steps.
        batch_size: Pre-training batch size (blocks per step).
        seq_len: Pre-training block length in tokens.
        lr: Peak pre-training learning rate.
        num_docs: Corpus size in documents.
        num_threads: Torch CPU threads; the weights are only reproducible for the same value.

    Returns:
        The pre-trained model (float32, eval mode).
    """
    _set_determinism(seed, num_threads)
    start = time.perf_counter()
    corpus = generate_corpus(seed, num_docs)
    tokenizer = build_tokenizer(corpus)
    blocks = _pack_blocks(tokenizer, corpus, seq_len)
    print(f"corpus: {len(corpus)} docs, {blocks.numel()} tokens, vocab {len(tokenizer)}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer)).float()
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    losses = pretrain(model, blocks, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    init_unseen_token_rows(model, tokenizer.convert_tokens_to_ids(UNSEEN_TOKENS), seed)
    model.generation_config = _generation_config(tokenizer)
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    stats = {"num_docs": len(corpus), "num_tokens": blocks.numel(), "seed": seed, "steps": steps,
             "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "final_loss": final_loss}  # fmt: skip
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "README.md").write_text(_model_card(model, stats), encoding="utf-8")
    if data_dir is not None:
        write_task_dataset(data_dir, seed)
        write_preference_dataset(data_dir, seed)
    print(f"saved to {output_dir} in {time.perf_counter() - start:.1f}s")
    return model


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``python -m qlora_kit.demo_model --output DIR --data-dir DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="models/demo-base", help="model output directory")
    parser.add_argument("--data-dir", default="data/demo", help="task dataset output directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="pre-training steps")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--num-docs", type=int, default=DEFAULT_NUM_DOCS)
    parser.add_argument(
        "--preference-only", action="store_true", help="only write the preference pairs into --data-dir"
    )
    args = parser.parse_args(argv)
    if args.preference_only:
        write_preference_dataset(args.data_dir, seed=args.seed)
        return
    build_model(args.output, args.data_dir, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                lr=args.lr, num_docs=args.num_docs)  # fmt: skip


if __name__ == "__main__":
    main()
