"""Terminal rendering: what each command shows while it runs and when it ends (the CLI only parses and dispatches)."""

from __future__ import annotations

import os
from typing import Any


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class TrainProgress:
    """Turns the training stage's milestones into terminal output."""

    def __init__(self, console) -> None:
        self.console = console

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        if not is_main_process():
            return
        getattr(self, f"on_{event}", lambda _: None)(payload)

    def on_data(self, stats: dict[str, Any]) -> None:
        rows = sum(stats["rows"].values())
        share = stats["trained_tokens"] / max(stats["tokens"], 1)
        self.console.print(
            f"data: {rows} rows ({', '.join(f'{k}: {v}' for k, v in stats['formats'].items())}), "
            f"{stats['tokens']:,} tokens, {share:.0%} trained on; truncated {stats['truncated']}, "
            f"dropped {stats['dropped_too_long'] + stats['dropped_no_target']}; cache {stats.get('cache', 'off')}"
            + (f"; packing efficiency {stats['packing']['efficiency']:.0%}" if stats.get("packing") else "")
        )

    def on_preference_data(self, stats: dict[str, Any]) -> None:
        from qlora_kit.data.preference import unpaired_note

        formats = ", ".join(f"{k}: {v}" for k, v in stats["formats"].items())
        self.console.print(
            f"data: {stats['rows']} training and {stats['eval_rows']} held-out examples ({formats}), "
            f"{stats['prompt_tokens']:,} prompt and {stats['answer_tokens']:,} answer tokens; truncated "
            f"{stats['truncated']}, dropped {stats['dropped']}; cache {stats['cache']}"
            + (f"; {unpaired_note(stats['unpaired_pairs'])}" if stats["unpaired_pairs"] else "")
        )

    def on_preference_done(self, metrics: dict[str, Any]) -> None:
        from rich.table import Table

        self.console.print(
            f"{metrics['method']}: {metrics['steps']} steps in {metrics['train_runtime_s']:.1f}s, loss "
            f"{metrics['train_loss_first']:.3f} → {metrics['train_loss_last']:.3f}, peak memory "
            f"{metrics['peak_memory_bytes'] / 2**20:.0f} MiB; reference: {metrics['reference']}"
        )
        comparison = metrics.get("preference_comparison") or {}
        if comparison:
            table = Table(title="held-out pairs")
            table.add_column("metric")
            for name in comparison:
                table.add_column(name, justify="right")
            for key in dict.fromkeys(k for values in comparison.values() for k in values):
                table.add_row(key, *(_cell(values.get(key)) for values in comparison.values()))
            self.console.print(table)
        self.console.print(f"adapter: [bold]{metrics['run_dir']}/adapter[/bold]  (metrics.json beside it)")

    def on_model(self, info: dict[str, Any]) -> None:
        self.console.print(
            f"model: {info['total']:,} parameters, {info['trainable']:,} trainable LoRA "
            f"({info['trainable'] / info['total']:.2%}), compute dtype {info['dtype']}"
        )

    def on_resume(self, info: dict[str, Any]) -> None:
        self.console.print(f"resuming from {info['checkpoint']} (optimizer, scheduler, RNG and data position)")

    def on_done(self, metrics: dict[str, Any]) -> None:
        from rich.table import Table

        console = self.console
        console.print(
            f"trained {metrics['steps']} steps in {metrics['train_runtime_s']:.1f}s: loss "
            f"{metrics['train_loss_first']:.3f} → {metrics['train_loss_last']:.3f}, "
            f"{metrics['input_tokens_per_second']:,.0f} input tokens/s ({metrics['trained_tokens_per_second']:,.0f} "
            "trained), "
            f"peak memory {metrics['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
        comparison = metrics.get("comparison")
        if comparison:
            table = Table(title="held-out: base vs fine-tuned")
            table.add_column("metric")
            table.add_column("base", justify="right")
            table.add_column("fine-tuned", justify="right")
            for key in ("eval_loss", "eval_perplexity", "exact_match"):
                if f"{key}_base" in comparison:
                    table.add_row(key, f"{comparison[f'{key}_base']:.3f}", f"{comparison[f'{key}_tuned']:.3f}")
            console.print(table)
            samples = Table(title="held-out generations", show_lines=True)
            for column in ("prompt", "reference", "base", "fine-tuned"):
                samples.add_column(column, overflow="fold")
            for sample in comparison["samples"]:
                samples.add_row(sample["prompt"][-80:], sample["reference"], sample["base"], sample["tuned"])
            console.print(samples)
        console.print(f"adapter: [bold]{metrics['run_dir']}/adapter[/bold]  (metrics.json, loss_curve.png beside it)")


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


class EvalProgress:
    """One rich progress bar per (model, phase): called with a description and a total, returns an advance function."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )

    def __enter__(self) -> EvalProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def __call__(self, description: str, total: int):
        task = self.bars.add_task(description, total=total)
        return lambda done: self.bars.advance(task, done)


def show_eval(console, report: dict[str, Any]) -> None:
    from rich.table import Table

    from qlora_kit.evaluate.report import higher_is_better

    models = list(report["metrics"])
    table = Table(title="held-out: " + " vs ".join(models))
    table.add_column("metric")
    for name in models:
        table.add_column(name, justify="right")
    for name in models[1:]:
        table.add_column(f"Δ {name}", justify="right")
    for key in dict.fromkeys(k for m in models for k in report["metrics"][m]):
        cells = [f"{report['metrics'][m][key]:.4g}" if key in report["metrics"][m] else "–" for m in models]
        for name in models[1:]:
            delta = report["deltas"][name].get(key)
            good = delta is not None and delta != 0 and (delta > 0) == higher_is_better(key)
            cells.append("–" if delta is None else f"[{'green' if good else 'red'}]{delta:+.4g}[/]")
        table.add_row(key if higher_is_better(key) else f"{key} ↓", *cells)
    console.print(table)
    console.print(f"report: [bold]{report['run_dir']}[/bold]/eval.json, eval.md, eval.png, samples.jsonl")


def show_plan(console, recipe_path: str, result) -> None:
    """The memory plan: one line per part, the total against the budget, and what would fit."""
    from qlora_kit.plan import GIB

    console.print(f"plan for [bold]{recipe_path}[/bold]: {result.model}, batch {result.batch_size} x {result.length}")
    for name, value in result.parts.items():
        console.print(f"  {name:<22}{value / GIB:>9.2f} GiB")
    console.print(
        f"  {'total':<22}{result.total / GIB:>9.2f} GiB  (budget {result.budget_bytes / GIB:.2f} GiB "
        f"after 1 GiB headroom)"
    )
    console.print("[green]fits[/green]" if result.fits else "[red]does not fit[/red]")
    for line in result.suggestions + result.notes:
        console.print(f"  {line}")
    if result.longest:
        console.print(f"longest data.max_length that fits, at batch {result.batch_size}:")
        for row in result.longest:
            console.print(f"  {row['max_length']:>9,}  {row['switch']}")
