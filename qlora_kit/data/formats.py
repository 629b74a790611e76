"""Formats: each row is checked and brought to one of three canonical shapes the renderer knows.

``messages`` and ``sharegpt`` become ``{"messages": [...]}``; ``prompt_completion`` and ``alpaca`` become
``{"prompt": ..., "completion": ...}``; ``text`` stays ``{"text": ...}``. A column mapping renames the columns a format
reads (``columns: {messages: convo}``), and errors name the source's own column.
"""

from __future__ import annotations

from typing import Any

from qlora_kit.data.sources import BadRows, Row, RowError
from qlora_kit.errors import UserError

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}

# The Stanford Alpaca prompts; the no-input variant has no "### Input:" section at all.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Detection order: the first format whose columns the first row has wins.
DETECTION = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("text", ("text",)),
)


def detect_format(rows: list[Row], declared: str, label: str, columns: dict[str, str] | None = None) -> str:
    """The declared format, or the one the first row's (mapped) columns imply."""
    if declared != "auto":
        return declared
    present = set(rows[0].data)
    mapping = columns or {}
    for fmt, needed in DETECTION:
        if all(mapping.get(name, name) in present for name in needed):
            if fmt == "messages" and _looks_sharegpt(rows[0].data[mapping.get("messages", "messages")]):
                raise UserError(
                    f"{label}: column 'messages' holds from/value turns: set format: sharegpt and "
                    "columns: {conversations: messages}"
                )
            return fmt
    raise UserError(
        f"{label}: cannot tell the format from columns {sorted(present)}: set format to messages ('messages' list), "
        "sharegpt ('conversations'), alpaca ('instruction'/'output'), prompt_completion ('prompt' and 'completion') "
        "or text ('text'), and map other column names with columns: {messages: your_column}"
    )


def detection_note(fmt: str, declared: str, columns: dict[str, str] | None = None) -> str:
    """How the format was chosen, for the report: 'messages (detected from column convo)'."""
    if declared != "auto":
        return f"{fmt} (declared)"
    needed = dict(DETECTION)[fmt]
    names = [(columns or {}).get(name, name) for name in needed]
    return f"{fmt} (detected from column{'s' if len(names) > 1 else ''} {', '.join(names)})"


def _looks_sharegpt(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "from" in value[0]


def normalize_rows(rows: list[Row], fmt: str, columns: dict[str, str] | None, bad: BadRows) -> list[Row]:
    """Rows in canonical shape; invalid ones are skipped through ``bad`` (which raises past its limit)."""
    out = []
    for row in rows:
        try:
            out.append(normalize(row, fmt, columns))
        except RowError as exc:
            bad.skip(exc)
    return out


def normalize(row: Row, fmt: str, columns: dict[str, str] | None = None) -> Row:
    """One row checked and brought to its canonical shape (raises RowError naming the row)."""
    get = _Getter(row, fmt, columns or {})
    if fmt == "messages":
        data = {"messages": _messages(get("messages"), row, get.name("messages"))}
    elif fmt == "sharegpt":
        data = {"messages": _sharegpt(get("conversations"), row, get.name("conversations"))}
    elif fmt == "alpaca":
        data = _alpaca(get, row)
    elif fmt == "prompt_completion":
        data = _prompt_completion(get, row)
    elif fmt == "text":
        text = get("text")
        if not isinstance(text, str):
            raise RowError(row.where, f"'{get.name('text')}' must be a string", "text not a string")
        data = {"text": text}
    else:
        raise UserError(f"{row.where}: unknown format {fmt!r}")
    if "messages" in data:
        _needs_assistant(data["messages"], row)
    shape = "messages" if "messages" in data else "text" if "text" in data else "prompt_completion"
    return Row(data, row.where, shape)


class _Getter:
    """Reads a format's column through the mapping, naming the source's own column when it is missing."""

    def __init__(self, row: Row, fmt: str, columns: dict[str, str]) -> None:
        self.row, self.fmt, self.columns = row, fmt, columns

    def name(self, column: str) -> str:
        return self.columns.get(column, column)

    def __call__(self, column: str, required: bool = True) -> Any:
        value = self.row.data.get(self.name(column))
        if value is None and required:
            raise RowError(
                self.row.where,
                f"missing column '{self.name(column)}' that format '{self.fmt}' needs "
                f"(columns: {sorted(self.row.data)})",
                f"missing column '{self.name(column)}'",
            )
        return value


def _messages(value: Any, row: Row, key: str) -> list[dict[str, str]]:
    return _turns(value, row, key, "role", "content", {role: role for role in ROLES})


def _sharegpt(value: Any, row: Row, key: str) -> list[dict[str, str]]:
    return _turns(value, row, key, "from", "value", SHAREGPT_ROLES)


def _turns(value: Any, row: Row, key: str, role_key: str, text_key: str, roles: dict) -> list[dict[str, str]]:
    """Validate a list of turns named ``role_key``/``text_key`` and return them as role/content messages."""
    if not isinstance(value, list):
        kind = "messages" if role_key == "role" else "conversations"
        raise RowError(
            row.where, f"'{key}' must be a list of {{{role_key}, {text_key}}} objects", f"{kind} not a list"
        )
    if not value:
        raise RowError(
            row.where,
            f"'{key}' must be a non-empty list: an empty conversation has nothing to learn",
            "empty conversation",
        )
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise RowError(
                row.where, f"{key}[{i}] must be an object with '{role_key}' and '{text_key}'", "malformed message"
            )
        if not isinstance(turn[role_key], str) or turn[role_key] not in roles:
            raise RowError(
                row.where,
                f"{key}[{i}] has unknown role {turn[role_key]!r}: use one of {sorted(roles)}",
                "unknown role",
            )
        if not isinstance(turn[text_key], str):
            raise RowError(row.where, f"{key}[{i}].{text_key} must be text", "content not text")
        if roles[turn[role_key]] == "system" and not turn[text_key].strip():
            continue  # an empty system prompt (common in ShareGPT exports) would only render an empty block
        out.append({"role": roles[turn[role_key]], "content": turn[text_key]})
    return out


def _needs_assistant(messages: list[dict[str, str]], row: Row) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(row.where, "the conversation has no assistant message to learn from", "no assistant message")


def _alpaca(get: _Getter, row: Row) -> dict[str, str]:
    instruction, output, extra = get("instruction"), get("output"), get("input", required=False) or ""
    if not all(isinstance(v, str) for v in (instruction, output, extra)):
        raise RowError(row.where, "'instruction', 'input' and 'output' must be text", "alpaca field not text")
    template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
    return {"prompt": template.format(instruction=instruction, input=extra), "completion": output}


def _prompt_completion(get: _Getter, row: Row) -> dict[str, Any]:
    prompt, completion = get("prompt"), get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = _messages(prompt, row, get.name("prompt"))
        answer = _messages(completion, row, get.name("completion"))
        if not any(m["role"] == "assistant" for m in answer):
            raise RowError(row.where, "the completion has no assistant message to learn from", "no assistant message")
        return {"prompt": messages, "completion": answer}
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise RowError(
            row.where,
            f"'{get.name('prompt')}' and '{get.name('completion')}' must both be text or both be message lists",
            "prompt/completion types",
        )
    return {"prompt": prompt, "completion": completion}
