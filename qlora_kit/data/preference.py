"""Preference data: paired prompt/chosen/rejected rows and KTO's unpaired prompt/completion/label rows.

Rows are checked and detected like the SFT formats (a bad row names its file and line and counts against
``data.max_bad_rows``), rendered with the same chat template, BOS and EOS rules, and tokenized by qlora-kit itself, so
every trainer (DPO, ORPO, KTO, SimPO) sees the same tokens:

- ``prompt_ids``: the prompt, with one BOS when the model expects one, ending with the chat template's generation
  prompt;
- ``chosen_ids`` / ``rejected_ids`` (or ``completion_ids``): the answer, ending with an end-of-turn or EOS token.

Three row shapes are accepted: strings (``prompt`` + answers), conversations (``prompt`` a message list, answers the
assistant turns that follow), and full conversations that share a prefix (UltraFeedback-style ``chosen``/``rejected``
message lists, whose common leading messages are the prompt). Too long a pair loses the start of its prompt first,
then the ends of its answers.

KTO trains on unpaired rows; its training pairs are unpaired once checked and held out, as trl's
``unpair_preference_dataset`` does (chosen with label true, rejected with label false), and are then KTO rows like
any other: deduplicated, rendered, truncated and cached the same way.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from qlora_kit.data import cache
from qlora_kit.data.build import hold_out
from qlora_kit.data.sources import BadRows, Row, RowError, read_source
from qlora_kit.data.tokens import TokenRules
from qlora_kit.errors import UserError
from qlora_kit.recipe import DataSource, Recipe

# Bump whenever a change here changes the tokens produced from the same inputs (it is part of the cache key).
PIPELINE_VERSION = "qlora-kit-preference-2"
PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")
ROLES = {"system", "user", "assistant", "tool"}

# ---------------------------------------------------------------------------------------------------------------
# Formats


def detect(rows: list[Row], declared: str, label: str, columns: dict[str, str] | None, method: str) -> str:
    """``preference`` (paired) or ``unpaired`` (KTO), as declared or from the first row's columns."""
    mapping = columns or {}
    present = set(rows[0].data)
    has = {name: mapping.get(name, name) in present for name in {*PAIRED, *UNPAIRED}}
    fmt = declared
    if declared == "auto":
        fmt = "preference" if has["chosen"] or has["rejected"] else "unpaired" if has["label"] else "unknown"
    if fmt == "unpaired" and method != "kto":
        raise UserError(f"{label}: unpaired rows (prompt/completion/label) train with method: kto, not {method}")
    if fmt not in ("preference", "unpaired"):
        raise UserError(
            f"{label}: method {method} needs preference rows: 'prompt', 'chosen' and 'rejected' (strings or message "
            f"lists) or, for kto, 'prompt', 'completion' and 'label'; found columns {sorted(present)} (map other "
            "names with columns: {chosen: your_column})"
        )
    return fmt


def _get(row: Row, name: str, columns: dict[str, str] | None) -> Any:
    return row.data.get((columns or {}).get(name, name))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str | list) and not value)


def _turns(value: Any, row: Row, key: str) -> list[dict[str, str]]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str) for t in value
    ):
        raise RowError(
            row.where,
            f"'{key}' must be text or a list of {{role, content}} messages (roles {sorted(ROLES)})",
            f"malformed {key}",
        )
    return [{"role": t["role"], "content": t["content"]} for t in value]


def _shared_prefix(chosen: list[dict], rejected: list[dict]) -> int:
    count = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        count += 1
    return count


def normalize_pair(row: Row, columns: dict[str, str] | None = None) -> Row:
    """A paired row as ``{"prompt", "chosen", "rejected"}``: all text, or prompt messages and assistant messages."""
    prompt, chosen, rejected = (_get(row, name, columns) for name in PAIRED)
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        if _missing(value):
            raise RowError(row.where, f"the pair has no '{side}' answer: give both chosen and rejected", f"no {side}")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise RowError(row.where, "'prompt' must be text when chosen and rejected are text", "no prompt")
        data: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        data = _conversation_pair(row, prompt, chosen, rejected)
    if data["chosen"] == data["rejected"]:
        raise RowError(
            row.where, "chosen equals rejected: the pair prefers nothing; fix or remove it", "chosen = rejected"
        )
    return Row(data, row.where, "preference")


def _conversation_pair(row: Row, prompt: Any, chosen: Any, rejected: Any) -> dict[str, Any]:
    chosen, rejected = _turns(chosen, row, "chosen"), _turns(rejected, row, "rejected")
    if isinstance(prompt, list):
        messages = _turns(prompt, row, "prompt")
    else:
        # Full conversations: their shared leading messages are the prompt (a prompt column then only repeats it).
        shared = _shared_prefix(chosen, rejected)
        while shared and chosen[shared - 1]["role"] == "assistant":
            shared -= 1
        messages, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not messages and isinstance(prompt, str) and prompt:
            messages = [{"role": "user", "content": prompt}]
    if not messages:
        raise RowError(
            row.where, "the pair has no prompt: give 'prompt', or conversations that share one", "no prompt"
        )
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        if not any(t["role"] == "assistant" for t in turns):
            raise RowError(row.where, f"'{side}' has no assistant message after the prompt", f"no {side}")
    return {"prompt": messages, "chosen": chosen, "rejected": rejected}


def normalize_unpaired(row: Row, columns: dict[str, str] | None = None) -> Row:
    """A KTO row as ``{"prompt", "completion", "label"}`` (label true = desirable)."""
    prompt, completion, label = (_get(row, name, columns) for name in UNPAIRED)
    if _missing(completion) or _missing(prompt):
        raise RowError(row.where, "the row needs both 'prompt' and 'completion'", "no completion")
    if not isinstance(label, bool):
        raise RowError(row.where, f"'label' must be true or false, got {label!r}", "label not boolean")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Row({"prompt": prompt, "completion": completion, "label": label}, row.where, "unpaired")
    messages = _turns(prompt, row, "prompt")
    answer = _turns(completion, row, "completion")
    if not any(t["role"] == "assistant" for t in answer):
        raise RowError(row.where, "'completion' has no assistant message", "no completion")
    return Row({"prompt": messages, "completion": answer, "label": label}, row.where, "unpaired")


def normalize(row: Row, fmt: str, columns: dict[str, str] | None = None) -> Row:
    return normalize_pair(row, columns) if fmt == "preference" else normalize_unpaired(row, columns)


# trl's unpair_preference_dataset unpairs through datasets' map, whose default batch is 1000 pairs.
UNPAIR_BATCH = 1000


def unpair(pairs: list[Row]) -> list[Row]:
    """KTO rows from normalized pairs, as trl's ``unpair_preference_dataset`` makes them: each pair gives its chosen
    answer with label true and its rejected answer with label false, both with the pair's prompt (and its file and
    line, for errors). The order is trl's too: per batch of 1000 pairs, the chosen rows, then the rejected ones, so
    KTO's mismatched KL completions (a batch's completions rotated by one) pair a prompt with another prompt's answer
    rather than with the other answer of its own pair."""
    return _unpaired(
        pairs,
        lambda pair, side, label: Row(
            {"prompt": pair.data["prompt"], "completion": pair.data[side], "label": label}, pair.where, "unpaired"
        ),
    )


def unpair_tokenized(pairs):
    """Tokenized pairs (a datasets.Dataset) as tokenized KTO rows, in the order of ``unpair``: KTO's evaluation loss
    reads rows, while the held-out pairs themselves score the rewards."""
    from datasets import Dataset

    return Dataset.from_list(
        _unpaired(
            pairs.to_list(),
            lambda pair, side, label: {
                "prompt_ids": pair["prompt_ids"],
                "completion_ids": pair[f"{side}_ids"],
                "label": label,
            },
        )
    )


def _unpaired(pairs: list, make) -> list:
    out = []
    for start in range(0, len(pairs), UNPAIR_BATCH):
        for side, label in (("chosen", True), ("rejected", False)):
            out += [make(pair, side, label) for pair in pairs[start : start + UNPAIR_BATCH]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rendering and tokens


def render(tokenizer, prompt: Any, answer: Any) -> tuple[str, str]:
    """The prompt text (ending with the generation prompt) and the answer text that follows it."""
    from jinja2 import TemplateError

    if isinstance(prompt, str):
        return prompt, answer
    try:
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    except TemplateError as exc:
        raise ValueError(f"the chat template rejects this conversation: {exc}") from None
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently once an answer follows it")
    return head, full[len(head) :]


def answer_text(answer: Any) -> str:
    """An answer as plain text: the string, or the last assistant message's content."""
    if isinstance(answer, str):
        return answer
    return [m for m in answer if m["role"] == "assistant"][-1]["content"]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, text: str, rules: TokenRules) -> list[int]:
    """Prompt tokens with exactly one BOS when the model expects one."""
    ids = _ids(tokenizer, text)
    if rules.bos is not None and rules.adds_bos and (not ids or ids[0] != rules.bos):
        ids = [rules.bos, *ids]
    while len(ids) > 1 and rules.bos is not None and ids[0] == ids[1] == rules.bos:
        ids = ids[1:]
    return ids


def answer_ids(tokenizer, text: str, rules: TokenRules) -> list[int]:
    """Answer tokens ending with a stop token: the template's end of turn, else EOS is added (as for SFT)."""
    ids = _ids(tokenizer, text)
    if not any(t in rules.stops for t in ids[-3:]) and rules.eos is not None:
        ids = [*ids, rules.eos]
    return ids


def fit(prompt: list[int], answers: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Cut a too-long example: the prompt loses its start first (keeping BOS), down to half of ``max_length``; then
    the answers lose their ends. Returns the pieces and whether anything was cut."""
    longest = max(len(a) for a in answers)
    if len(prompt) + longest <= max_length:
        return prompt, answers, False
    keep = max(max_length - longest, min(len(prompt), max_length // 2))
    if keep < len(prompt):
        head = prompt[:1] if len(prompt) > 1 else []
        prompt = head + prompt[len(prompt) - keep + len(head) :] if keep > len(head) else prompt[:keep]
    room = max_length - len(prompt)
    return prompt, [a[:room] for a in answers], True


@dataclass
class PreferenceStats:
    rows: int = 0
    eval_rows: int = 0
    truncated: int = 0
    dropped: int = 0
    duplicates: int = 0
    unpaired_pairs: int = 0  # KTO: training pairs unpaired into twice as many rows
    formats: dict[str, str] = field(default_factory=dict)
    bad_rows: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    answer_tokens: int = 0
    cache: str = "off"  # hit, miss or off
    cache_path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "formats": dict(self.formats), "bad_rows": dict(self.bad_rows)}


def encode(row: Row, tokenizer, rules: TokenRules) -> dict[str, Any]:
    """One normalized row as token ids (raises RowError naming the row when its template rejects it)."""
    data = row.data
    sides = ("chosen", "rejected") if row.fmt == "preference" else ("completion",)
    try:
        rendered = [render(tokenizer, data["prompt"], data[side]) for side in sides]
    except ValueError as exc:
        raise RowError(row.where, str(exc), "chat template error") from None
    out: dict[str, Any] = {"prompt_ids": prompt_ids(tokenizer, rendered[0][0], rules)}
    for side, (_, text) in zip(sides, rendered, strict=True):
        out[f"{side}_ids"] = answer_ids(tokenizer, text, rules)
    if row.fmt == "unpaired":
        out["label"] = data["label"]
    if row.fmt == "preference" and out["chosen_ids"] == out["rejected_ids"]:
        raise RowError(row.where, "chosen and rejected render to the same tokens", "chosen = rejected")
    return out


def encode_rows(rows: list[Row], tokenizer, recipe: Recipe, stats: PreferenceStats, bad: BadRows) -> list[dict]:
    rules = TokenRules.of(tokenizer)
    out = []
    for row in rows:
        try:
            example = encode(row, tokenizer, rules)
        except RowError as exc:
            bad.skip(exc)
            continue
        sides = [k for k in example if k.endswith("_ids") and k != "prompt_ids"]
        prompt, answers, cut = fit(example["prompt_ids"], [example[k] for k in sides], recipe.data.max_length)
        if cut and recipe.data.truncation == "drop":
            stats.dropped += 1
            continue
        stats.truncated += cut
        example.update({"prompt_ids": prompt, **dict(zip(sides, answers, strict=True))})
        stats.prompt_tokens += len(prompt)
        stats.answer_tokens += sum(len(a) for a in answers)
        out.append(example)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The datasets


@dataclass
class PreferenceData:
    train: Any  # datasets.Dataset of prompt_ids + chosen_ids/rejected_ids (or completion_ids/label)
    eval: Any | None
    eval_rows: list[Row]
    stats: PreferenceStats


def read_rows(source: DataSource, label: str, recipe: Recipe, bad: BadRows, stats: PreferenceStats) -> list[Row]:
    rows = read_source(source, bad)
    fmt = detect(rows, source.format, f"{label} ({source.path})", source.columns, recipe.method)
    stats.formats[source.path] = fmt
    out = []
    for row in rows:
        try:
            out.append(normalize(row, fmt, source.columns))
        except RowError as exc:
            bad.skip(exc)
    if not out:
        raise UserError(f"{label} ({source.path}): no valid row is left after skipping {bad.reasons.total()} bad ones")
    return out


def _key(row: Row) -> str:
    return json.dumps(row.data, sort_keys=True, ensure_ascii=False)


def _dedupe(rows: list[Row], seen: set[str], stats: PreferenceStats) -> list[Row]:
    kept = []
    for row in rows:
        key = _key(row)
        if key in seen:
            stats.duplicates += 1
        else:
            seen.add(key)
            kept.append(row)
    return kept


def collect(recipe: Recipe, bad: BadRows, stats: PreferenceStats) -> tuple[list[Row], list[Row]]:
    """Training rows (all sources, in order, shuffled when there are several) and held-out rows."""
    data = recipe.data
    groups = [read_rows(source, f"data.train.{i}", recipe, bad, stats) for i, source in enumerate(data.train)]
    held = read_rows(data.eval, "data.eval", recipe, bad, stats) if data.eval is not None else []
    seen: set[str] = set()
    if data.dedupe:
        _dedupe(held, seen, stats)
        groups = [_dedupe(rows, seen, stats) for rows in groups]
    if data.eval_split:
        groups, held = hold_out(groups, data.eval_split, data.seed)  # a pair is held out whole
    if recipe.method == "kto":
        groups, held = unpair_for_kto(groups, held, seen if data.dedupe else None, stats)
    rows = [row for rows in groups for row in rows]
    if len(groups) > 1:
        random.Random(data.seed).shuffle(rows)
    return rows, held


def unpair_for_kto(
    groups: list[list[Row]], held: list[Row], seen: set[str] | None, stats: PreferenceStats
) -> tuple[list[list[Row]], list[Row]]:
    """KTO's training pairs as unpaired rows, deduplicated again as rows when ``seen`` is given (two pairs may share
    a prompt and chosen answer; a held-out pair's answer is not trained on). Held-out pairs stay pairs (they score
    the rewards), unless held out beside unpaired rows, which one dataset cannot hold together with them."""
    pairs_held = [row for row in held if row.fmt == "preference"]
    held_rows = [row for row in held if row.fmt == "unpaired"] + unpair(pairs_held)
    if pairs_held and len(pairs_held) < len(held):
        held = held_rows
    if seen is not None:
        seen.update(_key(row) for row in held_rows)
    out = []
    for rows in groups:
        if rows and rows[0].fmt == "preference":
            stats.unpaired_pairs += len(rows)
            rows = unpair(rows)
            rows = _dedupe(rows, seen, stats) if seen is not None else rows
        out.append(rows)
    return out, held


def build(recipe: Recipe, tokenizer) -> PreferenceData:
    """Read, check, hold out and tokenize the recipe's preference data, or load it from the data cache (the SFT
    pipeline's, keyed by the files' bytes, the tokenizer, every data option, the method and this pipeline's
    version)."""
    entry = None
    if recipe.data.cache:
        extra = {"pipeline": PIPELINE_VERSION, "method": recipe.method}
        key, description = cache.cache_key(recipe.data, tokenizer, extra)
        entry = cache.cache_root(recipe.data) / key
        cached = cache.load(entry)
        if cached is not None:
            stats = PreferenceStats(**{**cached["stats"], "cache": "hit", "cache_path": str(entry)})
            return PreferenceData(cached["train"], cached["eval"], cached["eval_rows"], stats)
    data = tokenize(recipe, tokenizer)
    if entry is not None:
        data.stats.cache, data.stats.cache_path = "miss", str(entry)
        cache.save(entry, data.train, data.eval, data.eval_rows, data.stats.as_dict(), description)
    return data


def tokenize(recipe: Recipe, tokenizer) -> PreferenceData:
    from datasets import Dataset

    stats, bad = PreferenceStats(), BadRows(recipe.data.max_bad_rows)
    rows, held = collect(recipe, bad, stats)
    train = encode_rows(rows, tokenizer, recipe, stats, bad)
    evaluation = encode_rows(held, tokenizer, recipe, stats, bad)
    stats.rows, stats.eval_rows, stats.bad_rows = len(train), len(evaluation), dict(Counter(bad.reasons))
    if not train:
        raise UserError("data.train: no preference example is left after truncation: raise data.max_length")
    return PreferenceData(Dataset.from_list(train), Dataset.from_list(evaluation) if evaluation else None, held, stats)


# ---------------------------------------------------------------------------------------------------------------
# What `qlora-kit data` shows


def unpaired_note(pairs: int) -> str:
    return f"{pairs} pairs unpaired into {2 * pairs} KTO rows (chosen: label true, rejected: label false)"


def show(console, tokenizer, data: PreferenceData, count: int, plain: bool) -> None:
    """Examples as prompt + each answer, the trained answer tokens set apart as in the SFT preview; then statistics."""
    from qlora_kit.data.preview import example_text
    from qlora_kit.data.tokens import IGNORE_INDEX

    sides = [name for name in data.train.column_names if name.endswith("_ids") and name != "prompt_ids"]
    marked = "in [[...]]" if plain else "in green"
    console.print(f"[bold]preference examples[/bold] (answers' trained tokens {marked})")
    for index in range(min(count, len(data.train))):
        row = data.train[index]
        label = f" (label {row['label']})" if "label" in row else ""
        console.print(f"-- example {index}{label}: prompt {len(row['prompt_ids'])} tokens")
        for side in sides:
            ids = row["prompt_ids"] + row[side]
            labels = [IGNORE_INDEX] * len(row["prompt_ids"]) + row[side]
            console.print(f"{side.removesuffix('_ids')}:", example_text(tokenizer, ids, labels, plain))
    stats = data.stats.as_dict()
    for key in ("rows", "eval_rows", "truncated", "dropped", "duplicates", "prompt_tokens", "answer_tokens"):
        console.print(f"{key}: {stats[key]}")
    for path, fmt in stats["formats"].items():
        console.print(f"format: {path}: {fmt}")
    if stats["unpaired_pairs"]:
        console.print(f"unpaired: {unpaired_note(stats['unpaired_pairs'])}")
    console.print(f"cache: {stats['cache']}" + (f" ({stats['cache_path']})" if stats["cache_path"] else ""))
    for reason, number in stats["bad_rows"].items():
        console.print(f"bad rows skipped ({reason}): {number}")
