"""Rendering and tokenizing: text plus the character spans the loss is computed on, then ids and labels.

Loss masks come from the rendered text itself: the chat template renders the conversation, and the characters of
each assistant turn (up to and including its end-of-turn token) are located by rendering the conversation prefix.
Tokens overlapping those characters are trained on, everything else gets label -100. This works for any template,
with or without ``{% generation %}`` markers, and never depends on pad/EOS ids for masking.

Tool calls are assistant turns and are trained like answers; tool results and the tools preamble are prompt. A turn's
reasoning is trained with its answer, masked (``reasoning: mask``: shown, not trained) or dropped before rendering.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Chat:
    """How a conversational row is rendered: its tools, template options (enable_thinking) and reasoning policy."""

    tools: list[dict] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    reasoning: str = "train"

    @classmethod
    def of(cls, data: dict[str, Any]) -> Chat:
        return cls(data.get("tools"), data.get("template_kwargs") or {}, data.get("reasoning", "train"))

    def apply(self, tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text; ``tools`` and the options reach the template exactly as at inference."""
        return tokenizer.apply_chat_template(
            messages,
            tools=self.tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )


def render_canonical(row: Row, tokenizer) -> tuple[str, Spans]:
    """Render a row already in canonical shape; a template that rejects the conversation is a row error."""
    from jinja2 import TemplateError

    data = row.data
    try:
        if "messages" in data:
            return chat_spans(tokenizer, data["messages"], chat=Chat.of(data))
        if "prompt" in data:
            prompt, completion = data["prompt"], data["completion"]
            if isinstance(prompt, list):
                return chat_spans(tokenizer, prompt + completion, trained_from=len(prompt), chat=Chat.of(data))
            return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
    except TemplateError as exc:
        message = f"the chat template rejects this conversation: {exc}"
        raise RowError(row.where, message, "chat template error") from None
    except Unrendered as exc:
        raise RowError(row.where, f"the chat template {exc.what}: {exc.fix}", f"template ignores {exc.kind}") from None
    return data["text"], [(0, len(data["text"]))]


class Unrendered(Exception):
    """The chat template silently left out part of the row (tools, a tool call, reasoning): never train on that."""

    def __init__(self, kind: str, what: str, fix: str) -> None:
        super().__init__(what)
        self.kind, self.what, self.fix = kind, what, fix


TOOLS_FIX = "use a template with tool support (model.chat_template: qwen3, qwen2.5 or llama-3.1, or the model's own)"


def _check_rendered(text: str, messages: list[dict], spans: Spans, turns: list[int], chat: Chat) -> None:
    """Tools, every tool call and the last reasoning must appear where the template put them."""
    names = [tool.get("function", tool).get("name") for tool in chat.tools or []]
    if names and not any(isinstance(name, str) and name in text for name in names):
        raise Unrendered("tools", "does not render tools (the row's tools column)", TOOLS_FIX)
    for (start, end), i in zip(spans, turns, strict=True):
        for call in messages[i].get("tool_calls") or []:
            if call["function"]["name"] not in text[start:end]:
                raise Unrendered("tool calls", f"does not render the tool call of message {i}", TOOLS_FIX)
    with_reasoning = [m for m in messages if m["role"] == "assistant" and m.get("reasoning_content")]
    if with_reasoning and with_reasoning[-1]["reasoning_content"].strip() not in text:
        raise Unrendered(
            "reasoning",
            "does not render reasoning (the reasoning_content of assistant turns)",
            "use a template that renders it (model.chat_template: qwen3 or deepseek-r1, or the model's own), or set "
            "reasoning: drop on this source",
        )


def chat_spans(tokenizer, messages: list[dict], trained_from: int = 0, chat: Chat | None = None) -> tuple[str, Spans]:
    """Render a conversation; each assistant turn's span runs from after its generation prompt to its end of turn."""
    chat = chat or Chat()
    text = chat.apply(tokenizer, messages)
    spans: Spans = []
    turns: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < trained_from:
            continue
        span = _turn_span(tokenizer, text, messages, i, chat, spans[-1][1] if spans else 0)
        if span is None and message.get("tool_calls"):  # an untrained call would go unnoticed: say so instead
            raise Unrendered(
                "tool calls", f"renders the tool call of message {i} where it cannot be located", TOOLS_FIX
            )
        if span is not None:
            spans.append(span)
            turns.append(i)
    _check_rendered(text, messages, spans, turns, chat)
    if chat.reasoning == "mask":
        pairs = zip(spans, turns, strict=True)
        spans = [_without_reasoning(text, span, messages[i].get("reasoning_content")) for span, i in pairs]
    return text, spans


def _turn_span(tokenizer, text: str, messages: list[dict], i: int, chat: Chat, after: int) -> tuple[int, int] | None:
    """Where assistant turn ``i`` lies in ``text``: after the generation prompt the template gives at inference."""
    prefix = chat.apply(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
    if text.startswith(prefix) and len(prefix) >= after:
        upto = text if i == len(messages) - 1 else chat.apply(tokenizer, messages[: i + 1])
        if text.startswith(upto) and len(upto) > len(prefix):
            return len(prefix), len(upto)
        # Templates that render a turn differently once more turns follow (Qwen3 drops earlier reasoning, Phi-3
        # variants add EOS only at the very end): the turn runs from the prompt to its end-of-turn marker.
        end = _first_end_marker(tokenizer, text, len(prefix))
        if end is not None:
            return len(prefix), end
    # The prefix itself renders differently: fall back to the content, searched after the previous span, plus the
    # end-of-turn markers that follow it, so the model still learns to stop.
    content = messages[i]["content"]
    start = text.find(content, after) if content else -1
    return (start, _after_end_markers(tokenizer, text, start + len(content))) if start >= 0 else None


_CLOSING_TAG = re.compile(r"\s*</[^<>\s]{1,32}>\s*")  # the tag that closes a reasoning block: </think>


def _without_reasoning(text: str, span: tuple[int, int], reasoning: str) -> tuple[int, int]:
    """The span from the answer on: the reasoning block (and its opening and closing tags) is shown, not trained."""
    start, end = span
    body = (reasoning or "").strip()
    if not body:
        return span
    found = text.find(body, start, end)
    if found < 0:
        return span  # the template did not render this turn's reasoning
    after = found + len(body)
    closing = _CLOSING_TAG.match(text, after)
    return (closing.end() if closing else after), end


def _first_end_marker(tokenizer, text: str, start: int) -> int | None:
    markers = _end_markers(tokenizer)
    found = [text.find(marker, start) for marker in markers]
    found = [position for position in found if position >= 0]
    return _skip_markers(markers, text, min(found)) if found else None


def _after_end_markers(tokenizer, text: str, end: int) -> int:
    return _skip_markers(_end_markers(tokenizer), text, end)


def _end_markers(tokenizer) -> list[str]:
    return [marker for marker in tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)) if marker]


def _skip_markers(markers: list[str], text: str, end: int) -> int:
    """The position after the end-of-turn markers that start at ``end`` (Phi-3 writes <|end|> then EOS)."""
    moved = True
    while moved:
        moved = False
        for marker in markers:
            if text.startswith(marker, end):
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
    if "messages" in data or isinstance(data.get("prompt"), list):
        messages = data["messages"] if "messages" in data else data["prompt"] + data["completion"]
        first = 0 if "messages" in data else len(data["prompt"])
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first)
        prompt = Chat.of(data).apply(tokenizer, messages[:last], add_generation_prompt=True)
        return prompt, reference_answer(messages[last])
    if "prompt" in data:
        return data["prompt"], data["completion"]
    return None


def inference_mismatch(row: Row, tokenizer) -> str | None:
    """Why the training text of a conversation is not its inference prompt + answer, or None when it is.

    The prompt is what ``apply_chat_template(..., add_generation_prompt=True)`` gives for the conversation before
    its last answer, the way a server would build it; training must show the model that exact text before the answer.
    """
    data = row.data
    conversation = data.get("messages") or (data["prompt"] + data["completion"] if "prompt" in data else None)
    if not isinstance(conversation, list):
        return None
    from jinja2 import TemplateError

    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    chat = Chat.of(data)
    text, _ = render_canonical(row, tokenizer)  # a row the template rejects raises its RowError
    try:
        prompt = chat.apply(tokenizer, conversation[:last], add_generation_prompt=True)
    except TemplateError:
        return None  # e.g. Mistral's template rejects a conversation ending in a tool result
    if not text.startswith(prompt):
        at = next(
            (k for k, (a, b) in enumerate(zip(text, prompt, strict=False)) if a != b), min(len(text), len(prompt))
        )
        return (
            f"{row.where}: the training text and the inference prompt differ at character {at}: training has "
            f"{text[at : at + 24]!r} where inference has {prompt[at : at + 24]!r}"
        )
    answer = conversation[last]["content"].strip()
    if answer and answer not in text[len(prompt) :]:
        return f"{row.where}: the answer does not follow the inference prompt in the training text"
    return None


def reference_answer(message: dict[str, Any]) -> str:
    """An assistant turn's answer as text: its content, or its tool calls as JSON when it only calls tools."""
    if message["content"] or not message.get("tool_calls"):
        return message["content"]
    return json.dumps([call["function"] for call in message["tool_calls"]], ensure_ascii=False)
