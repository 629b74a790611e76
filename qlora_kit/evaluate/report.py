"""The evaluation report: eval.json, eval.md, eval.png and samples.jsonl, written into the run directory.

Files are written to a staging folder first and moved into the run directory only once all of them exist; existing
report files are replaced only with ``--force``.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from qlora_kit.errors import UserError
from qlora_kit.evaluate.generation import normalize
from qlora_kit.rundir import fresh_staging, publish_files

REPORT_FILES = ("eval.json", "eval.md", "eval.png", "samples.jsonl")
LOWER_IS_BETTER = ("eval_loss", "perplexity", "logp_rejected")


def check_outputs(run_dir: Path, force: bool) -> None:
    existing = [name for name in REPORT_FILES if (run_dir / name).exists()]
    if existing and not force:
        raise UserError(f"{run_dir} already holds an evaluation ({', '.join(existing)}): pass --force to replace it")


def higher_is_better(metric: str) -> bool:
    return not metric.endswith(LOWER_IS_BETTER)


def deltas(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each model's change against the base, metric by metric (positive = the value went up)."""
    base = metrics.get("base", {})
    return {
        name: {key: value - base[key] for key, value in values.items() if key in base}
        for name, values in metrics.items()
        if name != "base"
    }


def similarity(prediction: str, reference: str) -> float:
    """Character-level similarity in [0, 1] after exact match's normalisation (difflib's ratio)."""
    return difflib.SequenceMatcher(None, normalize(prediction), normalize(reference)).ratio()


def sample_rows(prompts: list[str], references: list[str], outputs: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One row per prompt with every model's answer, the biggest changes (tuned vs base) first.

    The change is the difference in similarity to the reference, so an answer that became right (or wrong) ranks
    above one that merely changed wording; ties keep the held-out order.
    """
    rows = []
    for i, (prompt, reference) in enumerate(zip(prompts, references, strict=True)):
        row: dict[str, Any] = {"index": i, "prompt": prompt, "reference": reference}
        row.update({name: answers[i] for name, answers in outputs.items()})
        row["exact_match"] = {name: normalize(answers[i]) == normalize(reference) for name, answers in outputs.items()}
        row["similarity"] = {name: round(similarity(answers[i], reference), 4) for name, answers in outputs.items()}
        if "base" in outputs and "tuned" in outputs:
            row["change"] = round(row["similarity"]["tuned"] - row["similarity"]["base"], 4)
        rows.append(row)
    return sorted(rows, key=lambda r: (-abs(r.get("change", 0.0)), r["index"]))


def write_report(report: dict[str, Any], samples: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """Write all four files to a staging folder, then move them into ``run_dir``; return their paths."""
    staging = fresh_staging(run_dir / "eval")
    (staging / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (staging / "eval.md").write_text(markdown(report))
    plot(report, staging / "eval.png")
    (staging / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))
    return publish_files(staging, run_dir, REPORT_FILES)


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def _delta(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    better = value > 0 if higher_is_better(metric) else value < 0
    mark = " ✓" if better and value != 0 else ""
    return f"{value:+.4g}{mark}"


def markdown(report: dict[str, Any]) -> str:
    """The comparison table (base vs tuned vs merged, with deltas against the base) and the settings."""
    models = list(report["metrics"])
    changed = [m for m in models if m != "base"]
    header = ["metric", *models, *(f"Δ {m}" for m in changed)]
    lines = [f"# Evaluation of {report['run_dir']}", ""]
    examples = report["examples"]
    lines.append(
        f"Held-out examples: {examples['loss']} scored for loss, {examples['generation']} generated "
        f"({report['settings']['generation_mode']}). ↓ marks metrics where lower is better; ✓ marks a "
        "change for the better against the base."
    )
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    keys = list(dict.fromkeys(k for m in models for k in report["metrics"][m]))
    for key in keys:
        label = key if higher_is_better(key) else f"{key} ↓"
        cells = [_fmt(report["metrics"][m].get(key)) for m in models]
        cells += [_delta(report["deltas"][m].get(key), key) for m in changed]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += [
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(report["settings"], indent=2),
        "```",
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """One small bar chart per metric (their scales differ), bars for base, tuned and merged side by side."""
    from matplotlib.figure import Figure  # not pyplot: the caller's matplotlib backend is left alone

    models = list(report["metrics"])
    keys = list(dict.fromkeys(k for m in models for k in report["metrics"][m]))
    columns = min(4, max(len(keys), 1))
    rows = (len(keys) + columns - 1) // columns or 1
    fig = Figure(figsize=(3.2 * columns, 2.6 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    colors = {"base": "#9e9e9e", "tuned": "#1f77b4", "merged": "#ff7f0e"}
    for ax, key in zip(axes.flat, keys, strict=False):
        values = [report["metrics"][m].get(key, float("nan")) for m in models]
        bars = ax.bar(models, values, color=[colors.get(m, "#2ca02c") for m in models])
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7)
        ax.set_title(key if higher_is_better(key) else f"{key} (lower is better)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.2)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"base vs tuned{' vs merged' if 'merged' in models else ''}: {Path(report['run_dir']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
