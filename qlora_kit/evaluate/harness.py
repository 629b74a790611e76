"""Standard benchmarks through lm-evaluation-harness (the optional ``lm-eval`` extra).

lm-eval can build a 4-bit model and attach a PEFT adapter itself (``peft=`` in its model arguments), but it builds
its own quantization config from loose keyword arguments, and on CPUs with AVX512-BF16 bitsandbytes would then run
the float32 model through its bf16 kernel. qlora-kit hands lm-eval the very model object it evaluates everywhere
else instead (its ``HFLM(pretrained=model)`` path): the recipe's 4-bit base with the adapter loaded by peft, so
benchmark numbers belong to exactly the model that was trained.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

from qlora_kit.errors import UserError
from qlora_kit.recipe import LmEvalSection


def check_installed() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(
            "eval.lm_eval.tasks: lm-evaluation-harness is not installed: pip install 'qlora-kit[lm-eval]' "
            "(or clear eval.lm_eval.tasks)"
        ) from None


def task_manager(section: LmEvalSection):
    """lm-eval's TaskManager with the recipe's own task folder; every task name is checked before any model loads."""
    check_installed()
    from lm_eval.tasks import TaskManager

    if section.include_path and not Path(section.include_path).is_dir():
        raise UserError(f"eval.lm_eval.include_path: folder {section.include_path} does not exist")
    if not section.include_defaults and not section.include_path:
        raise UserError("eval.lm_eval.include_defaults is false and no include_path is set: no task can be found")
    manager = TaskManager(include_path=section.include_path, include_defaults=section.include_defaults)
    known = manager.all_tasks
    for name in section.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise UserError(f"eval.lm_eval.tasks: unknown lm-eval task {name!r}{hint}")
    return manager


def run_tasks(
    model, tokenizer, section: LmEvalSection, manager, max_length: int | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Run the recipe's tasks on one model.

    Returns {task: {metric: value}} with lm-eval's filter suffix removed, and {task: documents evaluated}.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # lm-eval logs every request at INFO and warns that a model object bypasses its loader, which is the point.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=section.batch_size, max_length=max_length)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(section.tasks),
        task_manager=manager,
        num_fewshot=section.num_fewshot,
        limit=_limit(section.limit),
        log_samples=False,
        bootstrap_iters=0,  # stderr of mean metrics is analytic; bootstrapping the rest would dominate small runs
    )
    counts = {task: int(count["effective"]) for task, count in results.get("n-samples", {}).items()}
    return {task: _numbers(values) for task, values in results["results"].items()}, counts


def _limit(limit: float | None) -> int | float | None:
    """lm-eval reads a limit below 1 as a fraction of each task and anything else as a count."""
    if limit is None or limit < 1:
        return limit
    return int(limit)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """'acc,none' -> 'acc'; 'exact_match,strict-match' -> 'exact_match/strict-match'.

    Standard errors, the sample count and non-numbers are left out: the report compares scores.
    """
    out = {}
    for key, value in values.items():
        metric, _, filter_name = key.partition(",")
        if isinstance(value, bool) or not isinstance(value, int | float) or metric.endswith("_stderr"):
            continue
        if metric == "sample_len":
            continue
        out[metric if filter_name in ("", "none") else f"{metric}/{filter_name}"] = float(value)
    return out
