"""Terminal output for ``qlora-kit merge``: the plan, a progress bar over the bytes written, the verification."""

from __future__ import annotations

from typing import Any


class MergeProgress:
    """Turns the merge stage's milestones into terminal output."""

    def __init__(self, console) -> None:
        self.console = console
        self.bar = None
        self.task = None

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        getattr(self, f"on_{event}", lambda _: None)(payload)

    def on_plan(self, plan: dict[str, Any]) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.console.print(
            f"merge: strategy [bold]{plan['strategy']}[/bold], {plan['tensors']} tensors, "
            f"{plan['bytes'] / 2**20:,.0f} MiB of {str(plan['dtype']).removeprefix('torch.')} on {plan['device']}"
        )
        for note in plan["notes"]:
            self.console.print(f"note: {note}")
        self.bar = Progress(
            TextColumn("writing"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.bar.add_task("merge", total=plan["bytes"])

    def on_verify(self, step: dict[str, Any]) -> None:
        self.console.print(f"verify: {step['step']} on {step['examples']} examples")

    def on_tensor(self, tensor: dict[str, Any]) -> None:
        if self.bar is not None:
            if not self.bar.live.is_started:
                self.bar.start()
            self.bar.advance(self.task, tensor["bytes"])

    def on_written(self, written: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.stop()
        counts = written["counts"]
        self.console.print(
            f"wrote {written['shards']} shard(s) in {written['merge_seconds']:.1f}s: {counts['lora']} weights with "
            f"LoRA merged, {counts['dequantized']} dequantized from 4-bit, {counts['replaced']} replaced by the "
            "adapter"
        )

    def show_verification(self, verification: dict[str, Any] | None, strategy: str) -> None:
        from rich.table import Table

        if verification is None:
            self.console.print("verification skipped (merge.verify=false)")
            return
        limits = verification["thresholds"]
        table = Table(
            title=f"merged vs adapter on the 4-bit base ({verification['examples']} {verification['source']} examples)"
        )
        for column in ("measure", "value", "threshold"):
            table.add_column(column, justify="right" if column != "measure" else "left")
        table.add_row(
            "max |logit diff|", f"{verification['max_abs_logit_diff']:.3g}", f"{limits['max_abs_logit_diff']:g}"
        )
        table.add_row(
            "mean |logit diff|", f"{verification['mean_abs_logit_diff']:.3g}", f"{limits['mean_abs_logit_diff']:g}"
        )
        table.add_row("held-out loss (adapter)", f"{verification['loss_adapter']:.4f}", "")
        table.add_row("held-out loss (merged)", f"{verification['loss_merged']:.4f}", f"±{limits['max_loss_diff']:g}")
        if verification["generation_agreement"] is not None:
            table.add_row(
                "identical greedy generations",
                f"{verification['generation_agreement']:.0%}",
                f"≥ {limits['min_generation_agreement']:.0%}",
            )
        self.console.print(table)
        if strategy == "original":
            self.console.print(
                f"note: the original base differs from the trained model by max |logit diff| "
                f"{verification['max_abs_logit_diff']:.3g}, mean {verification['mean_abs_logit_diff']:.3g}, held-out "
                f"loss {verification['loss_merged'] - verification['loss_adapter']:+.4f}"
                + ("" if verification["enforced"] else " (thresholds reported, not enforced)")
            )

    def on_done(self, report: dict[str, Any]) -> None:
        self.show_verification(report["verification"], report["strategy"])
        self.console.print(f"merged model: [bold]{report['output']}[/bold]  (README.md and merge_report.json inside)")
