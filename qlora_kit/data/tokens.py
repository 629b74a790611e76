"""Rendering and tokenizing: text plus the character spans the loss is computed on, then ids and labels.

Loss masks come from the rendered text itself: the chat template renders the conversation, and the characters of
each assistant turn (up to and including its end-of-turn token) are located by rendering the conversation prefix.
Tokens overlapping those characters are trained on, everything else gets label -100. This works for any template,
with or without ``{% generation %}`` markers, and never depends on pad/EOS ids for masking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_kit.data.formats import normalize
from qlora_kit.data.sources import Row, RowError
from qlora_kit.tokenizer import adds_bos, end_of_turn_ids

IGNORE_INDEX = -100
Spans = list[tuple[int, int]]


def render(row: Row, fmt: str, tokenizer) -> tuple[str, Spans]:
    """Render a row (of any format) to text and the character spans of its trained part."""
    canonical = normalize(row, fmt)
    return render_canonical(canonical, tokenizer)


def render_canonical(row: Row, tokenizer) -> tuple[str, Spans]:
    """Render a row already in canonical shape; a template that rejects the conversation is a row error."""
    from jinja2 import TemplateError

    data = row.data
    try:
        if "messages" in data:
            return chat_spans(tokenizer, data["messages"])
        if "prompt" in data:
            prompt, completion = data["prompt"], data["completion"]
            if isinstance(prompt, list):
                return chat_spans(tokenizer, prompt + completion, trained_from=len(prompt))
            return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
    except TemplateError as exc:
        message = f"the chat template rejects this conversation: {exc}"
        raise RowError(row.where, message, "chat template error") from None
    return data["text"], [(0, len(data["text"]))]


def chat_spans(tokenizer, messages: list[dict], trained_from: int = 0) -> tuple[str, Spans]:
    """Render a conversation; each assistant turn's span runs from after its generation prompt to its end of turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: Spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < trained_from:
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if text.startswith(upto) and upto.startswith(prefix) and len(upto) > len(prefix):
            spans.append((len(prefix), len(upto)))
            continue
        # Templates that rewrite earlier turns (strip reasoning, add EOS only at the very end) break the prefix
        # property: fall back to the content itself, searched after the previous span, plus the end-of-turn
        # markers that follow it, so the model still learns to stop.
        start = text.find(message["content"], spans[-1][1] if spans else 0)
        if start >= 0:
            spans.append((start, _after_end_markers(tokenizer, text, start + len(message["content"]))))
    return text, spans


def _after_end_markers(tokenizer, text: str, end: int) -> int:
    markers = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    moved = True
    while moved:
        moved = False
        for marker in markers:
            if marker and text.startswith(marker, end):
                end, moved = end + len(marker), True
    return end


@dataclass(frozen=True)
class TokenRules:
    """What the tokenizer needs around a rendered text: BOS first (once), an end token trained at the end."""

    bos: int | None
    adds_bos: bool
    eos: int | None
    stops: frozenset[int]

    @classmethod
    def of(cls, tokenizer) -> TokenRules:
        return cls(
            tokenizer.bos_token_id, adds_bos(tokenizer), tokenizer.eos_token_id, frozenset(end_of_turn_ids(tokenizer))
        )


def labels_for(ids: list[int], offsets: list[tuple[int, int]], spans: Spans, rules: TokenRules) -> tuple[list, list]:
    """Labels (-100 outside the spans) for tokenized text; exactly one BOS when the model expects one; EOS trained."""
    labels, k = [], 0
    for token, (start, end) in zip(ids, offsets, strict=True):
        while k < len(spans) and spans[k][1] <= start:  # spans are sorted: skip those that ended before this token
            k += 1
        inside = k < len(spans) and spans[k][0] < end and spans[k][1] > start
        labels.append(token if inside else IGNORE_INDEX)
    ids = list(ids)
    bos = rules.bos
    if bos is not None and rules.adds_bos and (not ids or ids[0] != bos):
        ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
    while len(ids) > 1 and bos is not None and ids[0] == bos and ids[1] == bos:  # a template that adds BOS twice
        ids, labels = ids[1:], labels[1:]
    # The end of the trained part must hold a stop token (chat templates end turns with one); otherwise add EOS.
    tail = [t for t in labels if t != IGNORE_INDEX][-3:]
    if tail and not any(t in rules.stops for t in tail) and rules.eos is not None:
        ids, labels = [*ids, rules.eos], [*labels, rules.eos]
    return ids, labels


def tokenize(tokenizer, text: str, spans: Spans) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the spans); one BOS at most; EOS or end-of-turn trained at the end."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return labels_for(encoded["input_ids"], encoded["offset_mapping"], spans, TokenRules.of(tokenizer))


def encode_batch(rows: list[Row], tokenizer, rules: TokenRules) -> list[tuple[list, list] | RowError]:
    """Render rows and tokenize them in one batched call; a row the template rejects comes back as its error."""
    rendered: list[Any] = []
    for row in rows:
        try:
            rendered.append(render_canonical(row, tokenizer))
        except RowError as exc:
            rendered.append(exc)
    texts = [r[0] for r in rendered if not isinstance(r, RowError)]
    # The Rust tokenizer directly: the same ids and offsets as tokenizer(...), without per-row Python wrapping.
    encodings = iter(tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else [])
    out: list[tuple[list, list] | RowError] = []
    for item in rendered:
        if isinstance(item, RowError):
            out.append(item)
            continue
        encoding = next(encodings)
        out.append(labels_for(encoding.ids, encoding.offsets, item[1], rules))
    return out


def prompt_and_reference(row: Row, fmt: str, tokenizer) -> tuple[str, str] | None:
    """The text to generate from and the expected answer, for held-out comparisons (None for plain text)."""
    data = normalize(row, fmt).data
    if "messages" in data:
        messages = data["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return prompt, messages[last]["content"]
    if "prompt" in data:
        prompt, completion = data["prompt"], data["completion"]
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return text, [m for m in completion if m["role"] == "assistant"][-1]["content"]
        return prompt, completion
    return None
