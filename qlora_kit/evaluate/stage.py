"""The eval stage: base, base + adapter and (when it exists) the merged model, on the same held-out work.

The base is the recipe's 4-bit model exactly as it was trained against, and the tuned model is that base with the
saved adapter; the base is measured with the adapter disabled on the same object, so the two differ only by the
adapter. A merged model (``RUN_DIR/merged`` by default) is a plain transformers folder loaded unquantized.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_kit import data as data_stage
from qlora_kit import model as model_stage
from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit import tracking
from qlora_kit.data import preference as pref_data
from qlora_kit.errors import UserError
from qlora_kit.evaluate import harness, report
from qlora_kit.evaluate import preference as pref_eval
from qlora_kit.evaluate.generation import GenerationSettings, generate, heldout_loss, perplexity
from qlora_kit.evaluate.scoring import load_metrics, score
from qlora_kit.recipe import Recipe, load_recipe
from qlora_kit.resolve import resolve
from qlora_kit.rundir import CORE_PACKAGES, require_run, versions

VERSIONED_PACKAGES = (  # beside rundir.CORE_PACKAGES
    "evaluate",
    "lm_eval",
    "rouge_score",
    "sacrebleu",
)

# (description, total) -> a function told how many items finished; the CLI draws rich progress bars with it.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass
class EvalWork:
    dataset: Any  # tokenized examples (input_ids, labels) for the loss, or None for generation-only data
    prompts: list[str]
    references: list[str]
    source: str
    pairs: Any = None  # preference runs: tokenized held-out pairs (prompt_ids, chosen_ids, rejected_ids)


@dataclass
class EvalResult:
    report: dict[str, Any]
    samples: list[dict[str, Any]]
    paths: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def adapter_of_run(run_dir: Path) -> Path:
    """The run's adapter folder; a directory that is not a finished training run is the user's mistake."""
    adapter = require_run(run_dir)
    model_stage.check_adapter_files(adapter)
    return adapter


def eval_work(recipe: Recipe, tokenizer) -> EvalWork:
    """The held-out examples as training defined them (data.eval, or the same data.eval_split of train)."""
    data = recipe.data
    if data.eval is None and data.eval_split is None:
        raise UserError("the recipe has no held-out data: set data.eval.path=FILE (or data.eval_split) as an override")
    if recipe.method != "sft":
        return preference_work(recipe, tokenizer)
    if data.eval is not None:
        rows = data_stage.read_formatted(data.eval, "data.eval")
        source = data.eval.path
    else:
        rows = data_stage.build_datasets(recipe, tokenizer).eval_rows
        source = f"{data.eval_split:.0%} of data.train (seed {data.seed})"
    rows = rows[: recipe.eval.max_examples]
    encoded = data_stage.encode_rows(rows, tokenizer, data.max_length, data.truncation, data_stage.DataStats())
    pairs = data_stage.eval_prompts(rows, tokenizer, recipe.eval.max_examples)
    if not encoded["input_ids"] and not pairs:
        raise UserError(f"held-out data {source}: no example has a token to score or a prompt to answer")
    import datasets

    dataset = datasets.Dataset.from_dict(encoded) if encoded["input_ids"] else None
    return EvalWork(dataset, [p for p, _ in pairs], [r for _, r in pairs], source)


def preference_work(recipe: Recipe, tokenizer) -> EvalWork:
    """Held-out preference pairs: scored by log-probability, and their prompts answered (reference: chosen)."""
    import datasets

    stats, bad = pref_data.PreferenceStats(), data_stage.BadRows(recipe.data.max_bad_rows)
    _, rows = pref_data.collect(recipe, bad, stats)
    rows = [row for row in rows if row.fmt == "preference"][: recipe.eval.max_examples]
    if not rows:
        raise UserError("held-out data: preference metrics need paired rows (prompt, chosen, rejected)")
    encoded = pref_data.encode_rows(rows, tokenizer, recipe, stats, bad)
    prompts = [pref_data.render(tokenizer, row.data["prompt"], row.data["chosen"])[0] for row in rows]
    references = [pref_data.answer_text(row.data["chosen"]) for row in rows]
    source = recipe.data.eval.path if recipe.data.eval else f"{recipe.data.eval_split:.0%} of data.train"
    return EvalWork(None, prompts, references, source, datasets.Dataset.from_list(encoded))


@contextmanager
def starting_adapter(tuned, recipe: Recipe) -> Iterator[None]:
    """The adapter a preference run started from (``model.adapter``), active on the same base for the duration."""
    folder = Path(recipe.model.adapter)
    folder = folder / "adapter" if (folder / "adapter").is_dir() else folder
    model_stage.check_adapter_files(folder)
    tuned.load_adapter(str(folder), adapter_name="reference")
    tuned.set_adapter("reference")
    try:
        yield
    finally:
        tuned.set_adapter("default")
        tuned.delete_adapter("reference")


def reference_logps(tuned, recipe: Recipe, work: EvalWork, tokenizer) -> tuple[list[float], list[float]] | None:
    """Log-probabilities of the run's reference on the held-out pairs: the starting adapter, else the base."""
    if work.pairs is None:
        return None
    args = (tokenizer.pad_token_id, recipe.eval.batch_size)
    with starting_adapter(tuned, recipe) if recipe.model.adapter else tuned.disable_adapter():
        return pref_eval.pair_logps(tuned, work.pairs, *args)


def load_merged(recipe: Recipe, merged_dir: Path):
    """A merged model folder, unquantized: float32 on CPU, the compute dtype on a GPU."""
    from transformers import AutoModelForCausalLM

    resolved = resolve(recipe)
    dtype = resolved.compute_dtype if resolved.machine.on_gpu else torch.float32
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(merged_dir),
            dtype=dtype,
            device_map=resolved.device_map,
            attn_implementation=resolved.attn_implementation,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"merged model {merged_dir}: cannot load it: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------------------------
# Measuring one model


def _no_progress(_description: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def measure(
    model, tokenizer, work: EvalWork, recipe: Recipe, metrics, progress: ProgressFactory, name: str, reference=None
) -> tuple[dict[str, float], list[str]]:
    """Loss, perplexity and generation metrics of one model on the held-out work; also its answers. For preference
    pairs, the log-probabilities of chosen and rejected and, given the reference's, the implicit rewards."""
    values: dict[str, float] = {}
    if work.pairs is not None:
        logps = pref_eval.pair_logps(model, work.pairs, tokenizer.pad_token_id, recipe.eval.batch_size)
        beta = float(recipe.training.get("beta", 0.1))
        found = pref_eval.metrics(*logps, reference, beta)
        values.update({k: v for k, v in found.items() if k != "pairs"})
    if work.dataset is not None:
        advance = progress(f"{name}: loss", len(work.dataset))
        loss = heldout_loss(model, work.dataset, tokenizer.pad_token_id, recipe.eval.batch_size, advance=advance)
        values.update(eval_loss=loss, perplexity=perplexity(loss))
    answers: list[str] = []
    if work.prompts:
        settings = GenerationSettings.from_recipe(recipe.eval)
        answers = generate(
            model, tokenizer, work.prompts, settings=settings, advance=progress(f"{name}: generate", len(work.prompts))
        )
        values.update(score(metrics, answers, work.references))
    return values, answers


@contextmanager
def _as(peft_model, name: str) -> Iterator[None]:
    """The base is the adapter model with its adapter switched off; tuned is it switched on."""
    with peft_model.disable_adapter() if name == "base" else nullcontext():
        yield


# ---------------------------------------------------------------------------------------------------------------
# The stage


def run_eval(
    run_dir: Path,
    overrides: list[str] | None = None,
    force: bool = False,
    merged_dir: Path | None = None,
    progress: ProgressFactory | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Evaluate a training run and write eval.json, eval.md, eval.png and samples.jsonl into it."""
    started = time.perf_counter()
    log = log or (lambda _line: None)
    adapter_dir = adapter_of_run(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    report.check_outputs(run_dir, force)
    merged_dir = merged_dir or run_dir / "merged"
    if merged_dir != run_dir / "merged" and not (merged_dir / "config.json").is_file():
        raise UserError(f"--merged {merged_dir}: no config.json there: give a merged model folder")
    # Everything that can be wrong with the request is checked before the first model loads.
    metrics = load_metrics(recipe.eval.metrics)
    manager = harness.task_manager(recipe.eval.lm_eval) if recipe.eval.lm_eval.tasks else None
    tokenizer = tokenizer_rules.load_tokenizer(recipe, saved=adapter_dir)
    work = eval_work(recipe, tokenizer)
    log(
        f"held-out: {len(work.dataset) if work.dataset is not None else 0} examples scored, "
        f"{len(work.prompts)} prompts from {work.source}"
    )

    runner = _Runner(recipe, tokenizer, work, metrics, manager, progress or _no_progress, log)
    tuned = model_stage.load_adapter_model(recipe, adapter_dir, tokenizer)
    runner.reference = reference_logps(tuned, recipe, work, tokenizer)
    for name in ("base", "tuned"):
        with _as(tuned, name):
            runner.run(name, tuned)
    if recipe.model.adapter and work.pairs is not None:
        with starting_adapter(tuned, recipe):  # the model the preference run started from, e.g. the SFT run
            runner.run("start", tuned)
    del tuned
    if (merged_dir / "config.json").is_file():
        log(f"merged model: {merged_dir}")
        runner.run("merged", load_merged(recipe, merged_dir))

    full = build_report(
        run_dir, recipe, work, runner.results, merged_dir if "merged" in runner.results else None, started
    )
    if runner.task_counts:
        full["examples"]["lm_eval"] = runner.task_counts
    samples = report.sample_rows(work.prompts, work.references, runner.outputs) if work.prompts else []
    paths = report.write_report(full, samples, run_dir)
    tracking.log_to_run(run_dir, recipe, paths, "eval")  # into the run's MLflow run, when it reports to mlflow
    return EvalResult(full, samples, paths)


@dataclass
class _Runner:
    """Measures one model after another on the same work and collects what each produced."""

    recipe: Recipe
    tokenizer: Any
    work: EvalWork
    metrics: list
    manager: Any
    progress: ProgressFactory
    log: Callable[[str], None]
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    task_counts: dict[str, int] = field(default_factory=dict)
    reference: Any = None  # the reference's (chosen, rejected) log-probabilities, for preference runs

    def run(self, name: str, model) -> None:
        # No rewards for the reference against itself: the start (the adapter a preference run continued), or the base
        # when the run started from a fresh adapter.
        own = name == "start" or (name == "base" and not self.recipe.model.adapter)
        values, self.outputs[name] = measure(
            model, self.tokenizer, self.work, self.recipe, self.metrics, self.progress, name,
            None if own else self.reference,
        )  # fmt: skip
        if self.manager is not None:
            values.update(self._benchmarks(name, model))
        self.results[name] = values

    def _benchmarks(self, name: str, model) -> dict[str, float]:
        """lm-eval scores as flat ``lm_eval/<task>/<metric>`` entries, so table, deltas and chart treat them alike."""
        section = self.recipe.eval.lm_eval
        self.log(f"{name}: lm-eval {', '.join(section.tasks)}")
        tasks, counts = harness.run_tasks(model, self.tokenizer, section, self.manager, self.recipe.data.max_length)
        self.task_counts.update(counts)
        return {f"lm_eval/{task}/{metric}": v for task, values in tasks.items() for metric, v in values.items()}


def build_report(
    run_dir: Path,
    recipe: Recipe,
    work: EvalWork,
    results: dict[str, dict[str, float]],
    merged_dir: Path | None,
    started: float,
) -> dict[str, Any]:
    settings = GenerationSettings.from_recipe(recipe.eval)
    return {
        "run_dir": str(run_dir),
        "models": {
            "base": f"{recipe.model.name_or_path} ({_quantization(recipe)})",
            "tuned": f"base + adapter {run_dir / 'adapter'}",
            **({"start": f"base + starting adapter {recipe.model.adapter}"} if "start" in results else {}),
            **({"merged": str(merged_dir)} if merged_dir else {}),
        },
        "metrics": results,
        "deltas": report.deltas(results),
        "examples": {
            "loss": len(work.dataset) if work.dataset is not None else 0,
            "generation": len(work.prompts),
            **({"preference_pairs": len(work.pairs)} if work.pairs is not None else {}),
        },
        "settings": {
            "eval_data": work.source,
            "generation_mode": "sampling" if settings.do_sample else "greedy",
            "generation": settings.as_dict(),
            "metrics": list(recipe.eval.metrics),
            "max_examples": recipe.eval.max_examples,
            "lm_eval": recipe.eval.lm_eval.model_dump() if recipe.eval.lm_eval.tasks else None,
        },
        "versions": versions([*CORE_PACKAGES, *VERSIONED_PACKAGES]),
        "runtime_s": round(time.perf_counter() - started, 2),
    }


def _quantization(recipe: Recipe) -> str:
    quant = recipe.quantization
    if quant.load_in_4bit:
        double = ", double quant" if quant.bnb_4bit_use_double_quant else ""
        return f"4-bit {quant.bnb_4bit_quant_type}{double}, compute {resolve(recipe).compute_dtype}"
    return "8-bit" if quant.load_in_8bit else "unquantized"
