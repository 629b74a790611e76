"""Merge: a run's adapter and its base into one plain transformers model, verified, written atomically.

The base checkpoint is streamed tensor by tensor: each weight bitsandbytes quantized at training time is quantized
and dequantized the same way (strategy ``dequantized``, the default) or taken as stored (``original``), the LoRA
update is added, and the result goes straight into the output shard. The output is built in a hidden staging folder
and renamed into place only when complete and verified, so a folder at the output path is always a finished merge.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit.errors import UserError
from qlora_kit.merge.adapter import Adapter, check_combination, load_adapter
from qlora_kit.merge.base import base_layout, load_config, locate_checkpoint, merge_device
from qlora_kit.merge.checkpoint import Checkpoint, ShardWriter, parse_size, plan_shards
from qlora_kit.merge.outputs import copy_sentencepiece_model, model_card, write_config, write_generation_config
from qlora_kit.merge.verify import judge, merged_pass, reference_pass, verification_set
from qlora_kit.merge.weights import MergePlan, WeightMerger, plan_merge, stream_merge
from qlora_kit.recipe import Recipe, load_recipe
from qlora_kit.resolve import DTYPES, resolve
from qlora_kit.rundir import (
    check_apart,
    check_new_output,
    check_writable,
    peak_memory_bytes,
    publish,
    require_run,
    staging_dir_for,
    versions,
)

REPORT_NAME = "merge_report.json"
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass
class MergeResult:
    output: Path
    report: dict[str, Any]


class VerificationFailed(Exception):
    """The merged model diverged from the adapter beyond the recipe's thresholds; it was not published."""

    def __init__(self, report: dict[str, Any], kept: Path) -> None:
        super().__init__("; ".join(report["verification"]["failures"]))
        self.report, self.kept = report, kept


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def load_run(run_dir: Path, overrides: list[str]) -> tuple[Recipe, dict[str, Any]]:
    """The run's resolved recipe (with overrides; a bare key means a merge field) and its metrics."""
    require_run(run_dir)
    overrides = [item if "." in item.partition("=")[0] else f"merge.{item}" for item in overrides]
    recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        return recipe, {}
    try:
        return recipe, json.loads(metrics_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{metrics_file} is damaged ({exc}): run `qlora-kit train` again to rewrite it") from None


def load_adapters(run_dir: Path, recipe: Recipe) -> list[Adapter]:
    """The run's own adapter first, then the recipe's extra ones, each with its weight."""
    adapters = [load_adapter(run_dir, recipe.merge.weight, "run")]
    for index, extra in enumerate(recipe.merge.adapters):
        adapters.append(load_adapter(Path(extra.path).expanduser(), extra.weight, f"merge.adapters.{index}"))
    check_combination(adapters)
    trained_on = adapters[0].config.get("revision")
    if trained_on and recipe.model.revision and trained_on != recipe.model.revision:
        raise UserError(
            f"model.revision: the adapter was trained on revision {trained_on!r} of the base, not "
            f"{recipe.model.revision!r}: set model.revision={trained_on}"
        )
    return adapters


def output_dtype(recipe: Recipe) -> torch.dtype:
    name = recipe.merge.dtype
    return resolve(recipe).weights_dtype if name == "auto" else DTYPES[name]


def merge_inputs(run_dir: Path, recipe: Recipe) -> dict[str, Path]:
    """What a merge reads, which its output may never replace."""
    inputs = {f"the run's {name}": run_dir / name for name in ("adapter", "recipe.yaml", "metrics.json")}
    inputs.update({f"merge.adapters.{i}.path": Path(extra.path) for i, extra in enumerate(recipe.merge.adapters)})
    base = Path(recipe.model.name_or_path).expanduser()
    if base.exists():
        inputs["the base model (model.name_or_path)"] = base
    return inputs


def check_output(output: Path, force: bool, inputs: dict[str, Path]) -> None:
    check_apart(output, inputs, flag="--output")
    check_new_output(output, force, flag="--output")
    check_writable(output, flag="--output")


def check_disk_space(output: Path, needed: int) -> None:
    """Refuse to start a merge that cannot fit (the weights plus the verification's saved logits)."""
    folder = output.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(
            f"not enough disk space in {folder}: the merge needs about {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free; free some space or choose --output elsewhere"
        )


def _clear_leftovers(output: Path) -> None:
    """Remove what an interrupted earlier merge to the same output left behind (hidden, never complete)."""
    for leftover in [staging_dir_for(output), *output.parent.glob(f".{output.name}.logits-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class Prepared:
    recipe: Recipe
    metrics: dict[str, Any]
    adapters: list[Adapter]
    tokenizer: Any
    base_folder: Path
    config: Any
    checkpoint: Checkpoint
    layout: Any
    plan: MergePlan
    dtype: torch.dtype
    strategy: str


def prepare(run_dir: Path, output: Path, overrides: list[str], force: bool) -> Prepared:
    """Every check that needs no heavy work: run, adapters, base, shapes, output, disk space."""
    from transformers import AutoTokenizer

    recipe, metrics = load_run(run_dir, overrides)
    if recipe.quantization.load_in_8bit and recipe.merge.strategy == "dequantized":
        raise UserError(
            "merge.strategy: the run trained on an 8-bit base, and the dequantized strategy mirrors "
            "4-bit bitsandbytes only: use strategy=original"
        )
    check_output(output, force, merge_inputs(run_dir, recipe))
    adapters = load_adapters(run_dir, recipe)
    tokenizer = AutoTokenizer.from_pretrained(adapters[0].path)
    base_folder = locate_checkpoint(recipe)
    check_apart(output, {"the base model checkpoint": base_folder}, flag="--output")
    config = load_config(base_folder, recipe)
    checkpoint = Checkpoint(base_folder)
    layout = base_layout(config, recipe)
    dtype = output_dtype(recipe)
    plan = plan_merge(checkpoint, layout, adapters, dtype, len(tokenizer))
    output.parent.mkdir(parents=True, exist_ok=True)
    logits = recipe.merge.verify_examples * recipe.data.max_length * plan.vocab_rows * 4 if recipe.merge.verify else 0
    check_disk_space(output, plan.nbytes + logits)
    return Prepared(
        recipe,
        metrics,
        adapters,
        tokenizer,
        base_folder,
        config,
        checkpoint,
        layout,
        plan,
        dtype,
        recipe.merge.strategy,
    )


def tokenizer_folder(job: Prepared) -> Path:
    """The folder the run's tokenizer came from: model.tokenizer_name_or_path when it is a local folder, else the
    base checkpoint's."""
    named = job.recipe.model.tokenizer_name_or_path
    return Path(named).expanduser() if named and Path(named).expanduser().is_dir() else job.base_folder


def write_model(job: Prepared, staging: Path, device: torch.device, show) -> dict[str, Any]:
    """Stream the weights into staging, then config, tokenizer and generation config beside them."""
    shards = plan_shards(job.plan.specs, parse_size(job.recipe.merge.max_shard_size))
    writer = ShardWriter(staging, shards)
    merger = WeightMerger(job.checkpoint, job.layout, job.adapters, job.recipe, job.strategy, device)
    started = time.perf_counter()
    counts = stream_merge(job.plan, merger, writer, on_tensor=lambda spec: show("tensor", {"bytes": spec.nbytes}))
    seconds = time.perf_counter() - started
    write_config(job.config, staging, job.dtype, job.plan.vocab_rows, job.plan.tied, job.tokenizer)
    job.tokenizer.save_pretrained(staging)
    copy_sentencepiece_model(tokenizer_folder(job), staging)
    stops = write_generation_config(job.base_folder, job.config, staging, job.tokenizer)
    return {"counts": counts, "shards": len(shards), "merge_seconds": seconds, "eos_token_ids": stops}


def build_report(job: Prepared, run_dir: Path, output: Path, device, written: dict, verification) -> dict[str, Any]:
    passed = verification is None or verification["passed"] or not verification["enforced"]
    return {
        "complete": passed,
        "run_dir": str(run_dir),
        "output": str(output),
        "strategy": job.strategy,
        "dtype": str(job.dtype).removeprefix("torch."),
        "device": str(device),
        "base": {
            "name_or_path": job.recipe.model.name_or_path,
            "revision": job.recipe.model.revision,
            "checkpoint": str(job.base_folder),
            "largest_shard_bytes": job.checkpoint.largest_file_bytes,
        },
        "adapters": [
            {
                "path": str(a.path),
                "weight": a.weight,
                "dora": a.uses_dora,
                "rslora": bool(a.config.get("use_rslora")),
                "replaced": sorted(a.replacements),
            }
            for a in job.adapters
        ],
        "vocab_size": job.plan.vocab_rows,
        "tied_embeddings": job.plan.tied,
        "notes": job.plan.notes,
        **written,
        "output_bytes": job.plan.nbytes,
        "peak_memory_bytes": peak_memory_bytes(),
        "versions": versions(),
        "verification": verification,
    }


def merge_run(
    run_dir: Path, output: Path | None = None, overrides: list[str] | None = None, force: bool = False, progress=None
) -> MergeResult:
    """Merge the run's adapter(s) into its base and write a verified, complete model folder at ``output``."""
    show = progress or (lambda *args, **kwargs: None)
    run_dir = Path(run_dir)
    output = Path(output) if output else run_dir / "merged"
    job = prepare(run_dir, output, overrides or [], force)
    device = merge_device()
    show(
        "plan",
        {
            "strategy": job.strategy,
            "dtype": job.dtype,
            "tensors": len(job.plan.specs),
            "bytes": job.plan.nbytes,
            "device": device,
            "notes": job.plan.notes,
        },
    )
    _clear_leftovers(output)
    staging = staging_dir_for(output)
    try:
        with (
            quiet_loading(),
            tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.logits-") as logits,
        ):
            report = _merge_into(job, run_dir, output, staging, device, Path(logits), show)
    except VerificationFailed:
        raise
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in DISK_FULL:
            raise UserError(
                f"no disk space left writing the merge to {output.parent} ({exc.strerror}): nothing "
                "was kept; free some space or choose --output elsewhere"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    show("done", report)
    return MergeResult(output, report)


@contextlib.contextmanager
def quiet_loading():
    """No per-weight loading bars from transformers while verifying: the merge reports its own steps."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _merge_into(job: Prepared, run_dir: Path, output: Path, staging: Path, device, logits: Path, show) -> dict:
    heldout = reference = None
    if job.recipe.merge.verify:
        heldout = verification_set(job.recipe, job.tokenizer)
        show("verify", {"step": "adapter on the 4-bit base", "examples": len(heldout.examples)})
        reference = reference_pass(job.recipe, job.adapters, job.tokenizer, heldout, logits, job.metrics)
    staging.mkdir(parents=True)
    written = write_model(job, staging, device, show)
    show("written", written)
    verification = None
    if heldout is not None:
        show("verify", {"step": "merged model", "examples": len(heldout.examples)})
        merged = merged_pass(staging, job.dtype, job.tokenizer, job.recipe, heldout, logits)
        verification = judge(job.recipe, job.strategy, heldout, reference, merged)
    report = build_report(job, run_dir, output, device, written, verification)
    (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (staging / "README.md").write_text(model_card(job.recipe, report))
    if not report["complete"]:
        raise VerificationFailed(report, staging)
    publish(staging, output)
    return report
