"""What `qlora-kit data` shows: rendered examples with the trained tokens set apart, and the dataset's statistics."""

from __future__ import annotations

from typing import Any

from qlora_kit.data.build import PreparedData, packing_stats, padding_efficiency
from qlora_kit.data.tokens import IGNORE_INDEX

OPEN, CLOSE = "[[", "]]"  # marks trained tokens where colour is not available
TRAINED_STYLE = "black on green"


def runs(ids: list[int], labels: list[int]) -> list[tuple[list[int], bool]]:
    """Consecutive tokens grouped by whether they count toward the loss."""
    out: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if out and out[-1][1] == trained:
            out[-1][0].append(token)
        else:
            out.append(([token], trained))
    return out


def example_text(tokenizer, ids: list[int], labels: list[int], plain: bool):
    """A rich Text of one example: trained runs on a green background, or wrapped in [[...]] when plain."""
    from rich.text import Text

    text = Text()
    for run, trained in runs(ids, labels):
        piece = tokenizer.decode(run, skip_special_tokens=False)
        if trained and plain:
            text.append(f"{OPEN}{piece}{CLOSE}")
        else:
            text.append(piece, style=TRAINED_STYLE if trained else None)
    return text


def show_examples(console, tokenizer, prepared: PreparedData, count: int, plain: bool) -> None:
    from rich.panel import Panel

    legend = f"trained tokens are {'wrapped in ' + OPEN + '...' + CLOSE if plain else 'on a green background'}"
    console.print(f"[bold]rendered examples[/bold] ({legend})")
    for index in range(min(count, len(prepared.train))):
        row = prepared.train[index]
        body = example_text(tokenizer, row["input_ids"], row["labels"], plain)
        trained = sum(label != IGNORE_INDEX for label in row["labels"])
        title = f"example {index}: {len(row['input_ids'])} tokens, {trained} trained"
        console.print(Panel(body, title=title, title_align="left", expand=False) if not plain else body)
        if plain:
            console.print(f"-- {title}")


def stats_rows(prepared: PreparedData, max_length: int, batch_size: int, packing: dict[str, Any] | None) -> list:
    """(name, value) rows of the statistics table."""
    stats = prepared.stats
    rows = [
        (
            f"rows: {_short(path)}",
            f"{stats.rows[path]:,} read, {stats.used.get(path, 0):,} used · "
            f"{stats.detected.get(path, stats.formats.get(path, ''))}",
        )
        for path in stats.rows
    ]
    rows.append(("held-out rows", f"{stats.eval_rows:,}"))
    if stats.skipped:
        rows.append(("bad rows skipped", ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items()))))
    if any(stats.chat.values()):
        rows.append(("tools and reasoning", ", ".join(f"{k}: {v:,}" for k, v in stats.chat.items())))
    rows.append(("duplicates dropped", f"{stats.duplicates:,}"))
    rows.append(("training examples", f"{stats.examples:,}"))
    lengths = stats.lengths
    if lengths:
        rows.append(
            (
                "token length",
                f"min {lengths['min']} · p50 {lengths['p50']:.0f} · p90 {lengths['p90']:.0f} · "
                f"p99 {lengths['p99']:.0f} · max {lengths['max']} (max_length {max_length})",
            )
        )
    handled = ", ".join(f"{policy}: {count:,}" for policy, count in sorted(stats.truncation.items()))
    rows.append(("truncated", f"{stats.truncated:,}" + (f" ({handled})" if handled else "")))
    rows.append(("dropped", f"{stats.dropped_too_long:,} too long, {stats.dropped_no_target:,} with no trained token"))
    share = stats.trained_tokens / max(stats.tokens, 1)
    rows.append(("tokens trained on", f"{stats.trained_tokens:,} of {stats.tokens:,} ({share:.1%})"))
    padding = padding_efficiency(prepared.train, batch_size)
    rows.append((f"padding efficiency (batches of {batch_size})", f"{padding:.1%}"))
    if packing:
        rows.append(
            (
                "packing efficiency",
                f"{packing['efficiency']:.1%} ({packing['examples']:,} examples in "
                f"{packing['sequences']:,} {packing['strategy']} packs of {packing['max_length']})",
            )
        )
    rows.append(("cache", f"{stats.cache}" + (f" · {stats.cache_path}" if stats.cache_path else "")))
    return rows


def _short(path: str, width: int = 36) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def show_stats(console, prepared: PreparedData, max_length: int, batch_size: int, strategy: str, packing_on: bool):
    from rich.table import Table

    packing = prepared.stats.packing or packing_stats(prepared.train, max_length, strategy)
    table = Table(title="data statistics", show_header=False, title_justify="left")
    table.add_column("what", style="bold", overflow="fold")
    table.add_column("value", overflow="fold")
    for name, value in stats_rows(prepared, max_length, batch_size, packing):
        if name == "packing efficiency" and not packing_on:
            name += " (if training.packing were on)"
        table.add_row(name, value)
    console.print(table)
