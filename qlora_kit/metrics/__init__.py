"""Metric scripts for the ``evaluate`` library, shipped inside qlora-kit so they load offline.

``evaluate.load("rouge")`` fetches the metric script from the Hugging Face Hub; these files are local equivalents
that ``evaluate.load(path)`` imports without a network. Each one is a self-contained ``evaluate.Metric`` (evaluate
copies the file alone into its module cache, so a script must not import its neighbours).
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).parent

# Name in a recipe's eval.metrics -> the keys its result holds.
BUILTIN_METRICS: dict[str, tuple[str, ...]] = {
    "exact_match": ("exact_match",),
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("bleu",),
    "chrf": ("chrf",),
}


def metric_path(name: str) -> Path:
    """The script file of a built-in metric."""
    return METRICS_DIR / f"{name}.py"
