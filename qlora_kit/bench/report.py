"""bench.json and bench.md: the tables a benchmark prints and writes, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_kit.bench.measure import SIDES


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f} MiB"


def _num(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "–" if value is None else fmt.format(value)


# (label, key in a side's report, format, key in the ratios) for the rows every method shares.
TOKEN_ROWS = {
    "sft": (
        ("tokens/s (processed)", "tokens_per_second", "{:,.1f}", "tokens_per_second"),
        ("tokens/s (in the loss)", "loss_tokens_per_second", "{:,.1f}", "loss_tokens_per_second"),
        ("tokens/s (padded positions)", "padded_tokens_per_second", "{:,.1f}", None),
    ),
    "preference": (
        ("input tokens/s (policy, no padding)", "tokens_per_second", "{:,.1f}", "tokens_per_second"),
        ("trained tokens/s (completions)", "loss_tokens_per_second", "{:,.1f}", "loss_tokens_per_second"),
        ("positions/s (padding included)", "padded_tokens_per_second", "{:,.1f}", None),
    ),
}


def method_of(report: dict[str, Any]) -> str:
    return report.get("method", "sft")


def method_note(method: str) -> str | None:
    """What a preference report's token counts mean (None for SFT)."""
    if method == "sft":
        return None
    sequences = (
        "each row's completion and a mismatched KL completion"
        if method == "kto"
        else "the chosen and the rejected answer of every pair"
    )
    reference = ", and the reference on the same tokens without gradients" if method in ("dpo", "kto") else ""
    return (
        f"{method}: a step runs the policy on {sequences}{reference}, so its tokens/s is not comparable with SFT's. "
        "Input tokens: the non-pad tokens of every sequence the policy reads (prompt + answer, the prompt counted in "
        "each sequence); trained tokens: the completion tokens whose log-probabilities the loss compares."
    )


def train_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """(metric, toolkit, baseline, ratio) rows for the terminal and the Markdown table."""
    sides = report["sides"]
    names = [s for s in SIDES if s in sides]
    ratio = report.get("ratios", {})
    memory_keys = [k for k in sides["toolkit"]["memory"]]
    rows = [
        ("steps/s", "steps_per_second", "{:.3f}", "steps_per_second"),
        *TOKEN_ROWS["sft" if method_of(report) == "sft" else "preference"],
        ("step time, mean (s)", "step_time_mean_s", "{:.3f}", "step_time"),
        ("time to first step (s)", "time_to_first_step_s", "{:.1f}", "time_to_first_step"),
        ("final train loss", "final_loss", "{:.4f}", None),
        ("padding efficiency", "padding_efficiency", "{:.1%}", None),
        ("packing fill", "packing_fill", "{:.1%}", None),
        ("MFU (6N)", "mfu", "{:.1%}", None),
    ]
    table = [
        (label, *(_num(sides[n].get(key), fmt) for n in names), *([_num(ratio.get(rkey), "{:.2f}x")] if ratio else []))
        for label, key, fmt, rkey in rows
    ]
    for key in memory_keys:
        label = key.removesuffix("_bytes").replace("_", " ")
        table.append(
            (
                label,
                *(_mib(sides[n]["memory"][key]) for n in names),
                *(
                    [_num(ratio.get("peak_memory"), "{:.2f}x")]
                    if ratio and key == memory_keys[0]
                    else (["–"] if ratio else [])
                ),
            )
        )
    plan = report["plan"]
    table.append(("predicted peak (planner)", _mib(plan["total_bytes"]), *(["–"] * (len(names) - 1 + bool(ratio)))))
    table.append(
        (
            "4-bit weights: measured / planned",
            f"{_mib(sides['toolkit']['quantized_weight_bytes'])} / {_mib(plan['parts']['quantized_weights'])}",
            *(["–"] * (len(names) - 1 + bool(ratio))),
        )
    )
    return table


def train_markdown(report: dict[str, Any]) -> str:
    header = ["metric", *[s for s in SIDES if s in report["sides"]], *(["ratio"] if "ratios" in report else [])]
    method = method_of(report)
    note = method_note(method)
    lines = [
        f"# bench train: {report['recipe']} (method {method})",
        "",
        f"machine: {_machine_line(report['machine'])}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        *([note, ""] if note else []),
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in train_rows(report)]
    return "\n".join(lines) + "\n"


def generate_markdown(report: dict[str, Any]) -> str:
    header = "| model | batch | time to first token (s) | per-token latency (ms) | tokens/s | peak memory |"
    lines = [
        f"# bench generate: {report['path']}",
        "",
        f"machine: {_machine_line(report['machine'])}; dtype {report['dtype']}",
        "",
        header,
        "|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        memory = row.get("cuda_peak_allocated_bytes", row.get("peak_rss_bytes"))
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {row['time_to_first_token_s']:.3f} | "
            f"{row['per_token_latency_s'] * 1000:.1f} | {row['tokens_per_second']:,.1f} | {_mib(memory)} |"
        )
    return "\n".join(lines) + "\n"


def _machine_line(info: dict[str, Any]) -> str:
    if "gpu" in info:
        return f"{info['gpu']} ({info['gpu_memory_bytes'] / 2**30:.0f} GiB)"
    return f"{info['cpus']}-core CPU ({info['cpu']}), {info['platform']}"


def write_report(report: dict[str, Any], markdown: str, output_dir: Path, force: bool) -> None:
    """bench.json and bench.md, written to a staging folder and renamed into place."""
    from qlora_kit.rundir import check_new_output, fresh_staging, publish

    check_new_output(output_dir, force)
    staging = fresh_staging(output_dir)
    (staging / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (staging / "bench.md").write_text(markdown)
    publish(staging, output_dir)
