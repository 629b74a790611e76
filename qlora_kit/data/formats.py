"""Formats: each row is checked and brought to one of three canonical shapes the renderer knows.

``messages`` and ``sharegpt`` become ``{"messages": [...]}``; ``prompt_completion`` and ``alpaca`` become
``{"prompt": ..., "completion": ...}``; ``text`` stays ``{"text": ...}``. A column mapping renames the columns a format
reads (``columns: {messages: convo}``), and errors name the source's own column.

Chat rows may carry tool calling and reasoning: a ``tools`` column (JSON schemas, or a JSON string of them), assistant
``tool_calls`` (OpenAI/transformers shape, arguments as an object or a JSON string), ``tool`` results, ShareGPT's
``function_call``/``observation`` turns, and ``reasoning_content`` (or ``thinking``) on assistant turns. They are
brought to the shape transformers' ``apply_chat_template`` takes: arguments as objects, reasoning as
``reasoning_content``, tools as a list.
"""

from __future__ import annotations

import json
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
    "function_call": "assistant",  # LLaMA-Factory's ShareGPT: the assistant calls a tool (value: JSON call(s))
    "observation": "tool",  # and the tool's result comes back
}
REASONING_KEYS = ("reasoning_content", "thinking")  # transformers'/Qwen3's name first, then axolotl's alternative
CARRIED = ("template_kwargs", "reasoning")  # per-source chat options a canonical row keeps when normalized again

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


def normalize_rows(
    rows: list[Row], fmt: str, columns: dict[str, str] | None, bad: BadRows, chat: dict[str, Any] | None = None
) -> list[Row]:
    """Rows in canonical shape; invalid ones are skipped through ``bad`` (which raises past its limit)."""
    out = []
    for row in rows:
        try:
            out.append(normalize(row, fmt, columns, chat))
        except RowError as exc:
            bad.skip(exc)
    return out


def normalize(row: Row, fmt: str, columns: dict[str, str] | None = None, chat: dict[str, Any] | None = None) -> Row:
    """One row checked and brought to its canonical shape (raises RowError naming the row).

    ``chat`` holds a source's chat options: ``reasoning`` (train/mask/drop) and ``template_kwargs`` (enable_thinking);
    they travel with the row, so training, the pre-flight check and evaluation render it the same way.
    """
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
    if "text" not in data:
        _chat_extras(data, get, row, chat)
    shape = "messages" if "messages" in data else "text" if "text" in data else "prompt_completion"
    return Row(data, row.where, shape)


def _chat_extras(data: dict[str, Any], get: _Getter, row: Row, chat: dict[str, Any] | None) -> None:
    """Tools, tool-call order and the source's chat options of a conversational row."""
    conversation = data["messages"] if "messages" in data else data["prompt"] + data["completion"]
    if isinstance(conversation, str):
        return  # plain prompt/completion text
    if "messages" in data:
        _needs_assistant(conversation, row)
    _check_tool_order(conversation, row)
    tools = _tools(get("tools", required=False), row, get.name("tools"))
    if tools:
        data["tools"] = tools
    options = {key: row.data[key] for key in CARRIED if key in row.data} if chat is None else chat
    if options.get("reasoning") == "drop":
        for message in conversation:
            message.pop("reasoning_content", None)
    for key in CARRIED:
        if options.get(key) not in (None, {}, "train"):
            data[key] = options[key]


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


def _messages(value: Any, row: Row, key: str) -> list[dict[str, Any]]:
    return _turns(value, row, key, "role", "content", {role: role for role in ROLES})


def _sharegpt(value: Any, row: Row, key: str) -> list[dict[str, Any]]:
    return _turns(value, row, key, "from", "value", SHAREGPT_ROLES)


def _turns(value: Any, row: Row, key: str, role_key: str, text_key: str, roles: dict) -> list[dict[str, Any]]:
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
    turns = (_turn(turn, f"{key}[{i}]", row, role_key, text_key, roles) for i, turn in enumerate(value))
    return [message for message in turns if message is not None]


def _turn(turn: Any, where: str, row: Row, role_key: str, text_key: str, roles: dict) -> dict[str, Any] | None:
    """One turn as a message: role, content, and tool_calls / reasoning_content / tool name where given."""
    calls = turn.get("tool_calls") if isinstance(turn, dict) else None
    if not isinstance(turn, dict) or role_key not in turn or (text_key not in turn and not calls):
        raise RowError(row.where, f"{where} must be an object with '{role_key}' and '{text_key}'", "malformed message")
    raw = turn[role_key]
    if not isinstance(raw, str) or raw not in roles:
        raise RowError(row.where, f"{where} has unknown role {raw!r}: use one of {sorted(roles)}", "unknown role")
    role, content = roles[raw], turn.get(text_key)
    if raw == "function_call":  # ShareGPT: the call is the turn's text
        calls, content = _parse_json(content, row, f"{where}.{text_key}", "bad tool-call JSON"), ""
    if role == "tool" and isinstance(content, dict | list):
        content = json.dumps(content, ensure_ascii=False)  # a structured tool result is shown as its JSON
    content = "" if content is None and calls else content
    if not isinstance(content, str):
        raise RowError(row.where, f"{where}.{text_key} must be text", "content not text")
    if role == "system" and not content.strip():
        return None  # an empty system prompt (common in ShareGPT exports) would only render an empty block
    message: dict[str, Any] = {"role": role, "content": content}
    if calls:
        if role != "assistant":
            raise RowError(
                row.where,
                f"{where} has tool_calls but role {raw!r}: only assistant turns call tools",
                "tool calls on a non-assistant turn",
            )
        message["tool_calls"] = _tool_calls(calls, row, f"{where}.tool_calls")
    _reasoning(turn, message, row, where)
    if role == "tool":
        message.update({k: turn[k] for k in ("name", "tool_call_id") if isinstance(turn.get(k), str)})
    return message


def _reasoning(turn: dict, message: dict[str, Any], row: Row, where: str) -> None:
    # An empty field is no reasoning (datasets with a thinking column hold null or "" on every other turn).
    key = next((k for k in REASONING_KEYS if turn.get(k) not in (None, "")), None)
    if key is None:
        return
    if message["role"] != "assistant":
        raise RowError(
            row.where,
            f"{where}.{key} is on a {message['role']} turn: reasoning belongs to assistant turns only",
            "reasoning on a non-assistant turn",
        )
    if not isinstance(turn[key], str):
        raise RowError(row.where, f"{where}.{key} must be text", "reasoning not text")
    if turn[key].strip():
        message["reasoning_content"] = turn[key]


def _parse_json(value: Any, row: Row, where: str, kind: str) -> Any:
    """A JSON string parsed (objects and lists pass through); bad JSON is a bad row named by its key."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError(row.where, f"{where} is not valid JSON ({exc.msg} at character {exc.pos})", kind) from None


def _tool_calls(value: Any, row: Row, where: str) -> list[dict[str, Any]]:
    """Calls in transformers' shape: [{"type": "function", "function": {"name", "arguments": {...}}}]."""
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not value:
        raise RowError(row.where, f"{where} must be a list of calls", "bad tool-call JSON")
    calls = []
    for i, call in enumerate(value):
        inner = call.get("function", call) if isinstance(call, dict) else None
        name = inner.get("name") if isinstance(inner, dict) else None
        if not isinstance(name, str) or not name:
            raise RowError(row.where, f"{where}[{i}] must be an object with a function name", "bad tool-call JSON")
        arguments = _parse_json(inner.get("arguments", {}), row, f"{where}[{i}].arguments", "bad tool-call JSON")
        if not isinstance(arguments, dict):
            raise RowError(row.where, f"{where}[{i}].arguments must be a JSON object", "bad tool-call JSON")
        entry = {"type": "function", "function": {"name": name, "arguments": arguments}}
        calls.append({**({"id": call["id"]} if isinstance(call.get("id"), str) else {}), **entry})
    return calls


def _tools(value: Any, row: Row, key: str) -> list[dict[str, Any]]:
    """The tools column: a list of JSON schemas (or a JSON string of one); empty or missing means no tools."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    tools = _parse_json(value, row, f"'{key}'", "bad tools JSON")
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise RowError(row.where, f"'{key}' must be a list of JSON schema objects", "bad tools JSON")
    return tools


def _check_tool_order(messages: list[dict[str, Any]], row: Row) -> None:
    """Every tool result answers a call: an assistant turn with tool_calls comes before it, after the last user."""
    open_call = False
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            open_call = bool(message.get("tool_calls"))
        elif message["role"] == "user":
            open_call = False
        elif message["role"] == "tool" and not open_call:
            raise RowError(
                row.where,
                f"message {i} is a tool result without a preceding assistant tool call: add the assistant's "
                "tool_calls turn before it",
                "tool result without a call",
            )


def _needs_assistant(messages: list[dict[str, Any]], row: Row) -> None:
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
        if not any(m["role"] == "assistant" for m in answer):  # a tool call counts: it is an assistant turn
            raise RowError(row.where, "the completion has no assistant message to learn from", "no assistant message")
        return {"prompt": messages, "completion": answer}
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise RowError(
            row.where,
            f"'{get.name('prompt')}' and '{get.name('completion')}' must both be text or both be message lists",
            "prompt/completion types",
        )
    return {"prompt": prompt, "completion": completion}
