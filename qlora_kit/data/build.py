"""Building the datasets: read and check every source, dedupe, hold out, mix, tokenize (batched, in several processes
when that pays), apply the length policy, and cache the result."""

from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.data import cache
from qlora_kit.data.formats import detect_format, detection_note, normalize_rows
from qlora_kit.data.sources import BadRows, Row, RowError, read_source
from qlora_kit.data.tokens import (
    IGNORE_INDEX,
    TokenRules,
    encode_batch,
    inference_mismatch,
    render_canonical,
    tokenize,
)
from qlora_kit.errors import UserError
from qlora_kit.recipe import DataSource, Recipe

CHUNK = 1000  # rows per tokenizer call and per task handed to a worker process
PARALLEL_FROM = 20_000  # below this, starting worker processes costs more than it saves
PREFLIGHT_ROWS = 8  # conversations per split rendered both ways before tokenizing (a few ms each)


@dataclass
class DataStats:
    rows: Counter = field(default_factory=Counter)  # rows read per source
    used: Counter = field(default_factory=Counter)  # training rows per source after dedupe, hold-out and mixing
    formats: dict[str, str] = field(default_factory=dict)
    detected: dict[str, str] = field(default_factory=dict)  # how each source's format was chosen
    skipped: Counter = field(default_factory=Counter)  # bad rows skipped, by reason
    chat: Counter = field(default_factory=Counter)  # rows with tools; tool calls, tool results, reasoning turns
    duplicates: int = 0
    eval_rows: int = 0
    truncated: int = 0  # examples cut to max_length (truncate, truncate_prompt)
    truncation: Counter = field(default_factory=Counter)  # longer examples handled, by the policy that handled them
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: dict[str, float] = field(default_factory=dict)  # token length percentiles of the training examples
    cache: str = "off"  # hit, miss or off
    cache_path: str | None = None
    packing: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {name: dict(value) if isinstance(value, Counter) else value for name, value in vars(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataStats:
        counters = {"rows", "used", "skipped", "truncation", "chat"}
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**{k: Counter(v) if k in counters else v for k, v in known.items()})


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids and labels
    eval: Any | None
    eval_rows: list[Row]
    stats: DataStats


# ---------------------------------------------------------------------------------------------------------------
# Rows: read, check, dedupe, hold out, mix


def read_formatted(
    source: DataSource, label: str, bad: BadRows | None = None, stats: DataStats | None = None
) -> list[Row]:
    """Read a source and bring its rows to canonical shape under their (declared or detected) format."""
    bad = bad or BadRows()
    rows = read_source(source, bad)
    fmt = detect_format(rows, source.format, f"{label} ({source.path})", source.columns)
    chat = {"reasoning": source.reasoning, "template_kwargs": {}}
    if source.enable_thinking is not None:
        chat["template_kwargs"] = {"enable_thinking": source.enable_thinking}
    rows = normalize_rows(rows, fmt, source.columns, bad, chat)
    if not rows:
        raise UserError(f"{label} ({source.path}): no valid row is left after skipping {bad.reasons.total()} bad ones")
    if stats is not None:
        count_chat(rows, stats.chat)
        stats.formats[source.path] = fmt
        stats.detected[source.path] = detection_note(fmt, source.format, source.columns)
    return rows


def count_chat(rows: list[Row], counts: Counter) -> None:
    """What the conversations hold beyond plain turns, for the report."""
    for row in rows:
        data = row.data
        conversation = data.get("messages") or (data["prompt"] + data["completion"] if "prompt" in data else "")
        if not isinstance(conversation, list):
            continue
        counts["rows with tools"] += bool(data.get("tools"))
        counts["tool calls"] += sum(len(m.get("tool_calls") or []) for m in conversation)
        counts["tool results"] += sum(m["role"] == "tool" for m in conversation)
        counts["reasoning turns"] += sum(bool(m.get("reasoning_content")) for m in conversation)


def _key(row: Row) -> str:
    return json.dumps(row.data, sort_keys=True, ensure_ascii=False)


def dedupe(groups: list[list[Row]], held_out: list[Row], stats: DataStats) -> list[list[Row]]:
    """Drop repeated rows across all training sources, and training rows equal to a held-out one."""
    seen = {_key(row) for row in held_out}
    out = []
    for rows in groups:
        kept = []
        for row in rows:
            key = _key(row)
            if key in seen:
                stats.duplicates += 1
            else:
                seen.add(key)
                kept.append(row)
        out.append(kept)
    return out


def hold_out(groups: list[list[Row]], fraction: float, seed: int) -> tuple[list[list[Row]], list[Row]]:
    """Split each source by the same fraction with a fixed seed (before mixing, so no held-out row is trained on)."""
    rng = random.Random(seed)
    train, held = [], []
    for rows in groups:
        order = list(range(len(rows)))
        rng.shuffle(order)
        count = min(max(1, round(len(rows) * fraction)), len(rows) - 1) if len(rows) > 1 else 0
        chosen = set(order[:count])
        held += [rows[i] for i in sorted(chosen)]
        train.append([row for i, row in enumerate(rows) if i not in chosen])
    return train, held


def _take(rows: list[Row], count: int, rng: random.Random) -> list[Row]:
    """``count`` rows: whole copies while more are needed than there are, then a seeded sample in source order."""
    copies, rest = divmod(count, len(rows)) if rows else (0, 0)
    return rows * copies + [rows[i] for i in sorted(rng.sample(range(len(rows)), rest))]


def mix(sources: list[DataSource], groups: list[list[Row]], seed: int, stats: DataStats) -> list[Row]:
    """Weighted sources share their combined size in proportion to their weights; a fraction takes that share of
    its own source; other sources come whole. Deterministic for a seed."""
    rng = random.Random(seed)
    weighted = [(s, rows) for s, rows in zip(sources, groups, strict=True) if s.weight is not None]
    total = sum(len(rows) for _, rows in weighted)
    weights = sum(s.weight for s, _ in weighted)
    mixed = []
    for source, rows in zip(sources, groups, strict=True):
        if source.weight is not None:
            count = round(total * source.weight / weights)
        elif source.fraction is not None:
            count = max(1, round(len(rows) * source.fraction))
        else:
            count = len(rows)
        taken = _take(rows, count, rng)
        stats.used[source.path] += len(taken)
        mixed += taken
    if len(sources) > 1:  # interleave sources, so packing and batches see the mix rather than one source at a time
        rng.shuffle(mixed)
    return mixed


def collect_rows(recipe: Recipe, stats: DataStats, bad: BadRows) -> tuple[list[Row], list[Row]]:
    """Training rows (mixed) and held-out rows, checked and in canonical shape."""
    data = recipe.data
    groups = []
    for index, source in enumerate(data.train):
        groups.append(read_formatted(source, f"data.train.{index}", bad, stats))
        stats.rows[source.path] += len(groups[-1])
    held: list[Row] = []
    if data.eval is not None:
        held = read_formatted(data.eval, "data.eval", bad, stats)
        if data.eval.fraction is not None:
            held = _take(held, max(1, round(len(held) * data.eval.fraction)), random.Random(data.seed))
    if data.dedupe:
        groups = dedupe(groups, held, stats)
    if data.eval_split:
        groups, held = hold_out(groups, data.eval_split, data.seed)
    stats.eval_rows = len(held)
    return mix(data.train, groups, data.seed, stats), held


# ---------------------------------------------------------------------------------------------------------------
# Tokens: batched, in worker processes for large datasets


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer, rules: TokenRules) -> None:
    _WORKER.update(tokenizer=tokenizer, rules=rules)


def _encode_in_worker(rows: list[Row]) -> list:
    return encode_batch(rows, _WORKER["tokenizer"], _WORKER["rules"])


def processes_for(rows: int, requested: int | None) -> int:
    """The recipe's data.num_proc, or several processes (up to 8) for datasets large enough to pay for them."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8) if rows >= PARALLEL_FROM else 1


def _encoded_chunks(rows: list[Row], tokenizer, processes: int):
    rules = TokenRules.of(tokenizer)
    chunks = [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]
    if processes <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield chunk, encode_batch(chunk, tokenizer, rules)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork: workers inherit the tokenizer instead of re-importing transformers (seconds each).
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        processes, mp_context=context, initializer=_init_worker, initargs=(tokenizer, rules)
    ) as pool:
        for chunk, results in zip(chunks, pool.map(_encode_in_worker, chunks), strict=True):
            yield chunk, results


def _progress(show: bool | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    enabled = sys.stderr.isatty() if show is None else show
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not enabled,
    )


def encode_rows(
    rows: list[Row],
    tokenizer,
    max_length: int,
    policy: str,
    stats: DataStats,
    bad: BadRows | None = None,
    processes: int = 1,
    show_progress: bool | None = False,
    label: str = "tokenizing",
) -> dict:
    """Tokenize rows into columns, applying the length policy and dropping rows with nothing to learn."""
    bad = bad or BadRows()
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    with _progress(show_progress) as progress:
        task = progress.add_task(label, total=len(rows))
        for chunk, results in _encoded_chunks(rows, tokenizer, processes):
            for row, result in zip(chunk, results, strict=True):
                if isinstance(result, RowError):
                    bad.skip(result)
                    continue
                fitted = fit_length(row, *result, tokenizer, max_length, policy, stats)
                if fitted is not None:
                    _keep(*fitted, stats, columns)
            progress.advance(task, len(chunk))
    return columns


def fit_length(row: Row, ids: list, labels: list, tokenizer, max_length: int, policy: str, stats: DataStats):
    """An example no longer than max_length under the policy, or None when it is dropped; counts what was done."""
    if len(ids) <= max_length:
        return ids, labels
    if policy == "drop":
        stats.truncation["drop"] += 1
        stats.dropped_too_long += 1
        return None
    if policy == "drop_turns":
        fitted = drop_turns(row, tokenizer, max_length)
        if fitted is not None:
            stats.truncation["drop_turns"] += 1
            return fitted
        policy = "truncate_prompt"  # even the last exchange alone is too long: cut its prompt instead
    stats.truncated += 1
    stats.truncation[policy] += 1
    if policy == "truncate_prompt":
        return truncate_prompt(ids, labels, max_length, tokenizer.bos_token_id)
    return ids[:max_length], labels[:max_length]


def truncate_prompt(ids: list, labels: list, max_length: int, bos: int | None) -> tuple[list, list]:
    """Cut tokens from the left (after a leading BOS) so the last trained run (the answer and its end of turn)
    survives; an answer longer than the window keeps its beginning."""
    head = 1 if ids and bos is not None and ids[0] == bos else 0
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:
        return ids[:max_length], labels[:max_length]  # nothing to keep: the example is dropped as untrained
    start = trained[-1]
    while start > head and labels[start - 1] != IGNORE_INDEX:  # back to the start of the last trained run
        start -= 1
    excess = len(ids) - max_length
    if head + excess <= start:
        return ids[:head] + ids[head + excess :], labels[:head] + labels[head + excess :]
    # The answer alone does not fit the window: keep its beginning.
    room = max_length - head
    return ids[:head] + ids[start : start + room], labels[:head] + labels[start : start + room]


def drop_turns(row: Row, tokenizer, max_length: int) -> tuple[list, list] | None:
    """Drop whole earlier exchanges (keeping leading system turns) until the conversation fits; None when even the
    last exchange is too long, or the row is not a conversation."""
    messages = row.data.get("messages")
    if not messages:
        return None
    system = 0
    while system < len(messages) and messages[system]["role"] == "system":
        system += 1
    starts = [i for i in range(system, len(messages)) if messages[i]["role"] == "user"]
    for start in starts[1:]:
        shorter = Row({**row.data, "messages": messages[:system] + messages[start:]}, row.where, row.fmt)
        if not any(m["role"] == "assistant" for m in shorter.data["messages"]):
            return None
        ids, labels = tokenize(tokenizer, *render_canonical(shorter, tokenizer))
        if len(ids) <= max_length:
            return ids, labels
    return None


def _keep(ids: list[int], labels: list[int], stats: DataStats, columns: dict) -> None:
    trained = len(labels) - labels.count(IGNORE_INDEX)
    if trained == 0:
        stats.dropped_no_target += 1
        return
    stats.examples += 1
    stats.tokens += len(ids)
    stats.trained_tokens += trained
    columns["input_ids"].append(ids)
    columns["labels"].append(labels)


def length_percentiles(lengths: list[int]) -> dict[str, float]:
    import numpy as np

    if not lengths:
        return {}
    values = np.asarray(lengths)
    summary = {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}
    return {"min": int(values.min()), **summary, "max": int(values.max()), "mean": float(values.mean())}


# ---------------------------------------------------------------------------------------------------------------
# The stage


def process(recipe: Recipe, tokenizer, show_progress: bool | None = None) -> tuple[dict, dict | None, list, DataStats]:
    """Everything the cache stores: tokenized train and eval columns, held-out rows and statistics."""
    data = recipe.data
    stats = DataStats()
    bad = BadRows(limit=data.max_bad_rows)  # one budget for the whole dataset, whichever step finds the row bad
    train_rows, eval_rows = collect_rows(recipe, stats, bad)
    check_inference_prompts(train_rows[:PREFLIGHT_ROWS] + eval_rows[:PREFLIGHT_ROWS], tokenizer)
    processes = processes_for(len(train_rows), data.num_proc)
    train = encode_rows(
        train_rows,
        tokenizer,
        data.max_length,
        data.truncation,
        stats,
        bad,
        processes,
        show_progress,
        "tokenizing train",
    )
    if not train["input_ids"]:
        raise UserError("data.train: no example is left with a token to train on: check max_length and the formats")
    evaluation = None
    if eval_rows:
        evaluation = encode_rows(
            eval_rows,
            tokenizer,
            data.max_length,
            data.truncation,
            DataStats(),
            bad,
            1,
            show_progress,
            "tokenizing eval",
        )
    stats.skipped = Counter(bad.reasons)
    stats.lengths = length_percentiles([len(ids) for ids in train["input_ids"]])
    return train, evaluation, eval_rows, stats


def check_inference_prompts(rows: list[Row], tokenizer) -> None:
    """Pre-flight: training must render each conversation as apply_chat_template(..., add_generation_prompt=True)
    plus the answer, or the model learns from text it never sees at inference (a template that adds a <think> opener
    only to the generation prompt, or rewrites history). Rows the template rejects are left to the bad-row count."""
    problems = []
    for row in rows:
        try:
            problem = inference_mismatch(row, tokenizer)
        except RowError:  # a row the template rejects is counted as bad where it is encoded
            continue
        if problem:
            problems.append(problem)
    if problems:
        raise UserError(
            f"pre-flight check: {len(problems)} of {len(rows)} conversations render differently at training and at "
            f"inference; first: {problems[0]}: use a chat template whose generation prompt is what its assistant "
            "turns start with (model.chat_template), or the model's own"
        )


@contextmanager
def quiet_datasets():
    """Hide datasets' own progress bars (saving, loading, packing a few arrow tables) around our steps."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def build_datasets(recipe: Recipe, tokenizer, show_progress: bool | None = None) -> PreparedData:
    """Read, format and tokenize the recipe's train and eval data, or load them from the cache when unchanged."""
    with quiet_datasets():
        return _build(recipe, tokenizer, show_progress)


def _build(recipe: Recipe, tokenizer, show_progress: bool | None) -> PreparedData:
    import datasets

    data = recipe.data
    entry = None
    if data.cache:
        key, description = cache.cache_key(data, tokenizer)
        entry = cache.cache_root(data) / key
        cached = cache.load(entry)
        if cached is not None:
            stats = DataStats.from_dict(cached["stats"])
            stats.cache, stats.cache_path = "hit", str(entry)
            return _with_packing(recipe, PreparedData(cached["train"], cached["eval"], cached["eval_rows"], stats))
    train, evaluation, eval_rows, stats = process(recipe, tokenizer, show_progress)
    train_set = datasets.Dataset.from_dict(train)
    eval_set = datasets.Dataset.from_dict(evaluation) if evaluation and evaluation["input_ids"] else None
    if entry is not None:
        stats.cache, stats.cache_path = "miss", str(entry)
        cache.save(entry, train_set, eval_set, eval_rows, stats.as_dict(), description)
    return _with_packing(recipe, PreparedData(train_set, eval_set, eval_rows, stats))


def _with_packing(recipe: Recipe, prepared: PreparedData) -> PreparedData:
    """When training packs, record how full the packs are (tokens that count ÷ tokens processed)."""
    from qlora_kit.resolve import resolve

    if resolve(recipe).packing:
        strategy = recipe.training.get("packing_strategy", "bfd")
        prepared.stats.packing = packing_stats(prepared.train, recipe.data.max_length, strategy)
    return prepared


def packing_stats(dataset, max_length: int, strategy: str = "bfd") -> dict[str, Any]:
    """Pack with trl's own packer, exactly as SFTTrainer will, and measure how full the packed sequences are.

    Efficiency = real tokens ÷ (packed sequences × max_length): the share of a max_length-wide sequence slot that
    holds an example rather than padding. trl's padding-free collator does not pad at all, so this is a lower bound
    there; it is exact for attention kernels that need fixed-width rows.
    """
    from trl.data_utils import pack_dataset

    strategy = "bfd_split" if strategy == "bfd-requeue" else strategy
    with quiet_datasets():
        packed = pack_dataset(dataset.select_columns(["input_ids"]), max_length, strategy)
    lengths = [len(ids) for ids in packed["input_ids"]]
    tokens = sum(lengths)
    return {
        "strategy": strategy,
        "max_length": max_length,
        "sequences": len(lengths),
        "examples": len(dataset),
        "tokens": tokens,
        "efficiency": tokens / (len(lengths) * max_length) if lengths else 0.0,
    }


def padding_efficiency(dataset, batch_size: int, seed: int = 0) -> float:
    """Real tokens ÷ tokens processed for unpacked batches padded to their longest example (random batches)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    random.Random(seed).shuffle(lengths)
    processed = sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )
    return sum(lengths) / processed if processed else 0.0


def eval_prompts(rows: list[Row], tokenizer, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` (prompt, reference) pairs from held-out rows (plain-text rows have none)."""
    from qlora_kit.data.tokens import prompt_and_reference

    pairs = []
    for row in rows:
        pair = prompt_and_reference(row, row.fmt, tokenizer)
        if pair:
            pairs.append(pair)
        if len(pairs) >= limit:
            break
    return pairs


def cache_entries(root: Path) -> list[Path]:
    """Complete entries under a cache root (a folder with its stats.json written last)."""
    return sorted(p for p in root.glob("*") if (p / "stats.json").is_file()) if root.is_dir() else []
