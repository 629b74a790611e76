"""Data: sources → rows → formatted text → tokens with a loss mask → datasets the trainer takes.

Loss masks come from the rendered text itself: the chat template renders the conversation, and the characters of
each assistant turn (up to and including its end-of-turn token) are located by rendering the conversation prefix.
Tokens overlapping those characters are trained on, everything else gets label -100. This works for any template,
with or without ``{% generation %}`` markers, and never depends on pad/EOS ids for masking.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.errors import UserError
from qlora_kit.recipe import DataSource, Recipe

IGNORE_INDEX = -100
ROLES = {"system", "user", "assistant", "tool"}
LOCAL_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


@dataclass
class Row:
    """One input row and where it came from, so errors can name the file and row."""

    data: dict[str, Any]
    where: str
    fmt: str = "auto"


@dataclass
class DataStats:
    rows: Counter = field(default_factory=Counter)
    formats: dict[str, str] = field(default_factory=dict)
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": dict(self.rows),
            "formats": self.formats,
            "truncated": self.truncated,
            "dropped_too_long": self.dropped_too_long,
            "dropped_no_target": self.dropped_no_target,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
        }


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids and labels
    eval: Any | None
    eval_rows: list[Row]
    stats: DataStats


# ---------------------------------------------------------------------------------------------------------------
# Reading sources


def read_source(source: DataSource) -> list[Row]:
    """Read every row of a local file or hub dataset, keeping the line or row number of each."""
    path = Path(source.path).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"data file {source.path} does not exist: check data.train[].path / data.eval.path")
        rows = _read_local(path)
    else:
        rows = _read_hub(source)
    if not rows:
        raise UserError(f"data source {source.path} has no rows: give a file or split with at least one example")
    return rows


def _read_local(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of objects (or JSON Lines in a .jsonl file)")
        return [_as_row(item, f"{path} item {i}") for i, item in enumerate(data)]
    return _read_table(path)


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number}: not valid JSON ({exc.msg}): each line must be one object") from None
            rows.append(_as_row(item, f"{path} line {number}"))
    return rows


def _read_table(path: Path) -> list[Row]:
    import pyarrow.csv
    import pyarrow.parquet

    try:
        table = pyarrow.csv.read_csv(path) if path.suffix.lower() == ".csv" else pyarrow.parquet.read_table(path)
    except Exception as exc:  # pyarrow raises several types for malformed files
        kind = "CSV" if path.suffix.lower() == ".csv" else "Parquet"
        raise UserError(f"{path}: not a valid {kind} file: {str(exc).splitlines()[0]}") from None
    # CSV rows are numbered as a spreadsheet shows them: the header is line 1.
    offset = 2 if path.suffix.lower() == ".csv" else 0
    label = "line" if offset else "row"
    return [Row(item, f"{path} {label} {i + offset}") for i, item in enumerate(table.to_pylist())]


def _read_hub(source: DataSource) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.name, split=source.split, revision=source.revision)
    except Exception as exc:  # offline, missing, or a bad split name: all are the user's to fix
        raise UserError(
            f"data source {source.path!r}: not a local file and could not be loaded from the hub "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); check the path or your network"
        ) from None
    return [Row(item, f"{source.path} row {i}") for i, item in enumerate(dataset)]


def _as_row(item: Any, where: str) -> Row:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return Row(item, where)


# ---------------------------------------------------------------------------------------------------------------
# Formats


def detect_format(rows: list[Row], declared: str, label: str) -> str:
    """The declared format, or the one the first row's columns imply."""
    if declared != "auto":
        return declared
    columns = set(rows[0].data)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise UserError(
        f"{label}: cannot tell the format from columns {sorted(columns)}: set format to messages "
        "(a 'messages' list), prompt_completion ('prompt' and 'completion') or text ('text')"
    )


def _column(row: Row, name: str, fmt: str) -> Any:
    if name not in row.data or row.data[name] is None:
        raise UserError(f"{row.where}: missing column '{name}' that format '{fmt}' needs (columns: {sorted(row.data)})")
    return row.data[name]


def _messages(value: Any, row: Row, key: str = "messages") -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{row.where}: '{key}' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{row.where}: {key}[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise UserError(f"{row.where}: {key}[{i}] has unknown role {message['role']!r}: use one of {sorted(ROLES)}")
        if not isinstance(message["content"], str):
            raise UserError(f"{row.where}: {key}[{i}].content must be text")
    return [{"role": m["role"], "content": m["content"]} for m in value]


# ---------------------------------------------------------------------------------------------------------------
# Rendering: text plus the character spans the loss is computed on


def render(row: Row, fmt: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a row to text and the character spans of its trained part."""
    if fmt == "messages":
        messages = _messages(_column(row, "messages", fmt), row)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{row.where}: the conversation has no assistant message to learn from")
        return chat_spans(tokenizer, messages)
    if fmt == "prompt_completion":
        prompt, completion = _column(row, "prompt", fmt), _column(row, "completion", fmt)
        if isinstance(prompt, list):
            messages = _messages(prompt, row, "prompt") + _messages(completion, row, "completion")
            return chat_spans(tokenizer, messages, trained_from=len(prompt))
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise UserError(f"{row.where}: 'prompt' and 'completion' must both be text or both be message lists")
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
    text = _column(row, "text", fmt)
    if not isinstance(text, str):
        raise UserError(f"{row.where}: 'text' must be a string")
    return text, [(0, len(text))]


def chat_spans(tokenizer, messages: list[dict], trained_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; each assistant turn's span runs from after its generation prompt to its end of turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < trained_from:
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if text.startswith(upto) and upto.startswith(prefix):
            spans.append((len(prefix), len(upto)))
        else:
            # Templates that rewrite earlier turns (e.g. strip reasoning) break the prefix property:
            # fall back to the content itself, searched after the previous span.
            start = text.find(message["content"], spans[-1][1] if spans else 0)
            if start >= 0:
                spans.append((start, start + len(message["content"])))
    return text, spans


def tokenize(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the spans); one BOS at most; EOS or end-of-turn trained at the end."""
    from qlora_kit.model import end_of_turn_ids

    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    labels = [tid if any(s < end and e > start for start, end in spans) else IGNORE_INDEX for tid, (s, e) in
              zip(ids, offsets, strict=True)]
    bos = tokenizer.bos_token_id
    if bos is not None and adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
    while len(ids) > 1 and bos is not None and ids[0] == bos and ids[1] == bos:  # a template that adds BOS twice
        ids, labels = ids[1:], labels[1:]
    trained = [tid for tid in labels if tid != IGNORE_INDEX]
    stops = end_of_turn_ids(tokenizer)
    if trained and not any(t in stops for t in trained[-3:]) and tokenizer.eos_token_id is not None:
        ids, labels = [*ids, tokenizer.eos_token_id], [*labels, tokenizer.eos_token_id]
    return ids, labels


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own post-processor would put a BOS first (the model was pre-trained with one)."""
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def prompt_and_reference(row: Row, fmt: str, tokenizer) -> tuple[str, str] | None:
    """The text to generate from and the expected answer, for held-out comparisons (None for plain text)."""
    if fmt == "messages":
        messages = _messages(row.data.get("messages"), row)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return prompt, messages[last]["content"]
    if fmt == "prompt_completion":
        prompt, completion = row.data["prompt"], row.data["completion"]
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(_messages(prompt, row), tokenize=False, add_generation_prompt=True)
            return text, _messages(completion, row, "completion")[-1]["content"]
        return prompt, completion
    return None


# ---------------------------------------------------------------------------------------------------------------
# Building the datasets


def encode_rows(rows: list[Row], tokenizer, max_length: int, policy: str, stats: DataStats) -> dict:
    """Tokenize rows into columns, applying the length policy and dropping rows with nothing to learn."""
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    for row in rows:
        ids, labels = tokenize(tokenizer, *render(row, row.fmt, tokenizer))
        if len(ids) > max_length:
            if policy == "drop":
                stats.dropped_too_long += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            stats.truncated += 1
        trained = sum(label != IGNORE_INDEX for label in labels)
        if trained == 0:
            stats.dropped_no_target += 1
            continue
        stats.tokens += len(ids)
        stats.trained_tokens += trained
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
    return columns


def read_formatted(source: DataSource, label: str) -> list[Row]:
    """Read a source and stamp each row with its (declared or detected) format."""
    rows = read_source(source)
    fmt = detect_format(rows, source.format, f"{label} ({source.path})")
    for row in rows:
        row.fmt = fmt
    return rows


def build_datasets(recipe: Recipe, tokenizer) -> PreparedData:
    """Read, format and tokenize the recipe's train and eval data."""
    import datasets

    data = recipe.data
    stats = DataStats()
    train_rows: list[Row] = []
    for index, source in enumerate(data.train):
        rows = read_formatted(source, f"data.train.{index}")
        stats.rows[source.path] += len(rows)
        stats.formats[source.path] = rows[0].fmt
        train_rows += rows
    eval_rows: list[Row] = []
    if data.eval is not None:
        eval_rows = read_formatted(data.eval, "data.eval")
    elif data.eval_split:
        random.Random(data.seed).shuffle(train_rows)
        count = max(1, round(len(train_rows) * data.eval_split))
        eval_rows, train_rows = train_rows[:count], train_rows[count:]
    train = encode_rows(train_rows, tokenizer, data.max_length, data.truncation, stats)
    if not train["input_ids"]:
        raise UserError("data.train: no example is left with a token to train on: check max_length and the formats")
    evaluation = encode_rows(eval_rows, tokenizer, data.max_length, data.truncation, DataStats()) if eval_rows else None
    return PreparedData(
        train=datasets.Dataset.from_dict(train),
        eval=datasets.Dataset.from_dict(evaluation) if evaluation and evaluation["input_ids"] else None,
        eval_rows=eval_rows,
        stats=stats,
    )


def eval_prompts(rows: list[Row], tokenizer, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` (prompt, reference) pairs from held-out rows (plain-text rows have none)."""
    pairs = []
    for row in rows:
        pair = prompt_and_reference(row, row.fmt, tokenizer)
        if pair:
            pairs.append(pair)
        if len(pairs) >= limit:
            break
    return pairs
