"""Generation metrics: the recipe's ``eval.metrics`` resolved to ``evaluate`` modules or the user's own functions.

Built-in names load the metric scripts shipped in ``qlora_kit/metrics`` through ``evaluate.load(path)``, which needs
no network; a path loads any other ``evaluate`` metric script; ``module:function`` (or ``file.py:function``) calls a
Python function of ``(predictions, references)`` that returns a number or a mapping of numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.metrics import BUILTIN_METRICS, metric_path

ScoreFn = Callable[[list[str], list[str]], dict[str, float]]


@dataclass
class Metric:
    spec: str  # as written in the recipe
    compute: ScoreFn


def load_metrics(specs: list[str]) -> list[Metric]:
    """Resolve every metric before any model is loaded, so a bad name fails in seconds."""
    return [Metric(spec, _resolve(spec)) for spec in specs]


def score(metrics: list[Metric], predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every metric's values for one model's answers, in one flat mapping."""
    values: dict[str, float] = {}
    for metric in metrics:
        values.update(metric.compute(predictions, references))
    return values


def _resolve(spec: str) -> ScoreFn:
    if spec in BUILTIN_METRICS:
        return _evaluate_module(str(metric_path(spec)), spec)
    if ":" in spec and not Path(spec).exists():
        return _python_function(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return _evaluate_module(str(path), spec)
    raise UserError(
        f"eval.metrics: {spec!r} is not a built-in metric ({', '.join(BUILTIN_METRICS)}), an existing evaluate "
        "metric script or folder, or module:function"
    )


def _evaluate_module(path: str, spec: str) -> ScoreFn:
    import evaluate

    try:
        module = evaluate.load(path, keep_in_memory=True)
    except ImportError as exc:
        raise UserError(
            f"eval.metrics: {spec} needs a package that is not installed ({exc}); the built-in metrics "
            "need the metrics extra: pip install 'qlora-kit[metrics]'"
        ) from None
    except FileNotFoundError as exc:
        raise UserError(f"eval.metrics: {spec}: {exc}") from None

    def compute(predictions: list[str], references: list[str]) -> dict[str, float]:
        return _numbers(module.compute(predictions=predictions, references=references), spec)

    return compute


def _python_function(spec: str) -> ScoreFn:
    module_name, _, function_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            file_spec = importlib.util.spec_from_file_location(Path(module_name).stem, Path(module_name).expanduser())
            if file_spec is None or not Path(module_name).expanduser().is_file():
                raise ModuleNotFoundError(f"no file {module_name}")
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"eval.metrics: cannot import {module_name!r} for metric {spec!r}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"eval.metrics: {module_name!r} has no function {function_name!r} (metric {spec!r})")

    def compute(predictions: list[str], references: list[str]) -> dict[str, float]:
        return _numbers(function(predictions, references), function_name)

    return compute


def _numbers(result, name: str) -> dict[str, float]:
    """Keep the scalar results (per-example lists and strings are dropped from the report)."""
    if isinstance(result, numbers.Number):
        return {name: float(result)}
    if not isinstance(result, dict):
        raise UserError(f"eval.metrics: metric {name!r} returned {type(result).__name__}; return a number or a dict")
    return {key: float(value) for key, value in result.items() if isinstance(value, numbers.Number)}
