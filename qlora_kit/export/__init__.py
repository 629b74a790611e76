"""Export: a run as GGUF files for llama.cpp and Ollama, written by llama.cpp's own tools and verified by llama.cpp.

From the verified merged model (RUN_DIR/merged, merged first when missing), llama.cpp's converter writes one GGUF in
the merged model's precision with the chat template, BOS/EOS/pad and end-of-turn token in its metadata; llama.cpp's
quantizer makes each requested type from it. Every file is then loaded by llama.cpp (llama-cpp-python) and compared
with the merged transformers model on held-out data: perplexity, greedy generations token by token, and the prompt
tokens of llama.cpp's chat mode. Everything is built in a hidden staging folder and renamed into place only when
every check passed; a failed export keeps nothing.

With ``adapter_only`` the adapter is written as a GGUF LoRA, next to a GGUF of the base it was trained against (the
dequantized 4-bit base, so base + LoRA in llama.cpp reproduces the merged model) for people who keep one base and
many adapters.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit import rundir, tracking
from qlora_kit.export import convert, llamacpp, ollama, paths, report
from qlora_kit.export import verify as checks
from qlora_kit.merge import load_run, merge_run
from qlora_kit.recipe import Recipe
from qlora_kit.tokenizer import end_of_turn_ids


@dataclass
class ExportResult:
    output: Path
    report: dict[str, Any]


class ExportFailed(Exception):
    """A GGUF differed from the merged model beyond the recipe's thresholds; nothing was kept."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("; ".join(report["failures"]))
        self.report = report


@dataclass
class Job:
    run_dir: Path
    output: Path
    recipe: Recipe
    merged: Path
    tokenizer: Any
    heldout: Any
    conversation: list[dict] | None
    threads: int


def _overrides(items: list[str]) -> list[str]:
    """A key that does not start with a recipe section is an export field (`types=[f16]`, `verify=false`)."""
    sections = set(Recipe.model_fields)
    return [item if item.partition("=")[0].split(".")[0] in sections else f"export.{item}" for item in items]


def prepare(run_dir: Path, output: Path | None, overrides: list[str], force: bool, show) -> Job:
    """Every check before heavy work; merges the run first when RUN_DIR/merged is missing."""
    from transformers import AutoTokenizer

    recipe, _ = load_run(run_dir, _overrides(overrides))
    export = recipe.export
    default = run_dir / ("gguf-lora" if export.adapter_only else "gguf")
    output = Path(output or export.output or default)
    merged = run_dir / "merged"
    paths.check_output(output, [run_dir / "adapter", merged, run_dir / "recipe.yaml"], force)
    llamacpp.converter_dir()  # fail now, not after the merge, when llama.cpp is missing
    llamacpp.bindings()
    if not (merged / "merge_report.json").is_file():
        show("merge", {"merged": merged})
        merge_run(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    heldout, conversation = checks.held_out_data(recipe, tokenizer)
    threads = max(1, min(8, os.cpu_count() or 1))
    return Job(run_dir, output, recipe, merged, tokenizer, heldout, conversation, threads)


def export_run(
    run_dir: Path, output: Path | None = None, overrides: list[str] | None = None, force: bool = False, progress=None
) -> ExportResult:
    """Write the run's GGUF export (see the module docstring) at ``output`` (default RUN_DIR/gguf)."""
    show = progress or (lambda *args, **kwargs: None)
    job = prepare(Path(run_dir), output, overrides or [], force, show)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    staging = rundir.staging_dir_for(job.output)
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted export left: hidden, never complete
    staging.mkdir()
    try:
        result = _export_into(job, staging, show)
        if result["failures"]:
            raise ExportFailed(result)
        rundir.publish(staging, job.output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    reports = [job.output / name for name in (report.REPORT_NAME, "export.md")]
    tracking.log_to_run(job.run_dir, job.recipe, reports, "export")  # the run's MLflow run, when it reports to one
    show("done", result)
    return ExportResult(job.output, result)


def _weights(merged: Path) -> tuple[int, str]:
    """Number of weights in the merged model and its GGUF source type (its own precision)."""
    from qlora_kit.merge.checkpoint import Checkpoint

    specs = Checkpoint(merged).specs.values()
    count = sum(math.prod(spec.shape) for spec in specs)
    dtypes = {spec.dtype for spec in specs}
    source = "f32" if torch.float32 in dtypes else "bf16" if torch.bfloat16 in dtypes else "f16"
    return count, source


def _export_into(job: Job, staging: Path, show) -> dict[str, Any]:
    export = job.recipe.export
    weights, source_type = _weights(job.merged)
    base = job.run_dir.resolve().name
    per_file = [paths.BYTES_PER_WEIGHT[kind] for kind in export.types]
    paths.check_disk_space(staging, int(weights * (paths.BYTES_PER_WEIGHT[source_type] + sum(per_file)) * 1.05))
    texts = [*job.heldout.prompts, *job.heldout.texts]
    pre = convert.choose_pre_tokenizer(job.merged, staging, job.tokenizer, texts, export.pre_tokenizer)
    show("tokenizer", pre)
    eot = [t for t in end_of_turn_ids(job.tokenizer) if t != job.tokenizer.eos_token_id]
    chosen = None if pre["pre_tokenizer"] == "recognized by llama.cpp" else pre["pre_tokenizer"]
    if export.adapter_only:
        files, timings, lora = _write_adapter_only(job, staging, source_type, chosen, eot[:1], show)
    else:
        lora = None
        files, timings = _write_model(job.merged, staging, base, source_type, chosen, eot[:1], export.types, job, show)
    verification = _verify(job, files, lora, show) if export.verify else None
    first = next(iter(files.values()))
    family = ollama.write_modelfile(
        staging, first.name, job.tokenizer, export.system_prompt, lora.name if lora else None
    )
    found = {**rundir.versions(), "llama-cpp-python": llamacpp.version()}
    result = report.build(job, files, timings, pre, verification, family, lora, eot, found, rundir.peak_memory_bytes())
    report.write(staging, result)
    return result


def _write_model(merged: Path, staging: Path, base: str, source_type: str, pre, eot, types, job: Job, show):
    """llama.cpp's converter writes the source GGUF, its quantizer every requested type."""
    files: dict[str, Path] = {}
    timings: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=staging, prefix=".source-") as scratch:
        source = Path(scratch) / f"{base}-{source_type}.gguf"
        started = time.perf_counter()
        convert.convert_model(merged, source, source_type, pre, eot[0] if eot else None)
        convert_s = time.perf_counter() - started
        for kind in types:
            target = staging / f"{base}-{kind}.gguf"
            show("quantize", {"type": kind, "file": target.name})
            started = time.perf_counter()
            if kind == source_type:
                shutil.copyfile(source, target)
            else:
                llamacpp.quantize(source, target, kind, job.threads)
            timings[kind] = {"convert_s": convert_s, "quantize_s": time.perf_counter() - started}
            files[kind] = target
    return files, timings


def _write_adapter_only(job: Job, staging: Path, source_type: str, pre, eot, show):
    """The adapter as a GGUF LoRA, and the base it applies to (the dequantized 4-bit base) in each type."""
    lora = staging / f"{job.run_dir.resolve().name}-lora-{source_type}.gguf"
    show("lora", {"file": lora.name})
    convert.convert_lora(job.run_dir / "adapter", job.merged, lora, source_type)
    with tempfile.TemporaryDirectory(dir=staging, prefix=".base-") as scratch:
        base_hf = Path(scratch) / "base"
        # Weight 0 leaves the base exactly as training saw it: 4-bit weights dequantized, no adapter delta.
        merge_run(job.run_dir, base_hf, ["weight=0", "verify=false"])
        files, timings = _write_model(
            base_hf, staging, "base", source_type, pre, eot, job.recipe.export.types, job, show
        )
    return files, timings, lora


def _verify(job: Job, files: dict[str, Path], lora: Path | None, show) -> dict[str, Any]:
    export = job.recipe.export
    show("verify", {"step": "merged model and adapter in transformers", "examples": len(job.heldout.examples)})
    adapter = job.run_dir / "adapter" if not job.recipe.merge.adapters else None
    ref = checks.reference(job.recipe, job.merged, adapter, job.tokenizer, job.heldout)
    results: dict[str, Any] = {}
    failures: list[str] = []
    for kind, path in files.items():
        show("verify", {"step": f"{path.name}" + (f" + {lora.name}" if lora else "") + " in llama.cpp"})
        result = checks.check_gguf(path, ref, job.heldout, job.tokenizer, export.max_new_tokens, job.threads, lora)
        limit = getattr(export.max_perplexity_increase, kind)
        least = getattr(export.min_generation_agreement, kind)
        result["thresholds"] = {"max_perplexity_increase": limit, "min_generation_agreement": least}
        if result["perplexity_increase"] > limit:
            failures.append(
                f"{kind}: perplexity +{result['perplexity_increase']:.2%} > +{limit:.0%} over the merged model"
            )
        agreement = result["generation_agreement"]
        if agreement is not None and agreement < least:
            failures.append(
                f"{kind}: {agreement:.0%} of greedy generations identical to the merged model's < {least:.0%}"
            )
        results[kind] = result
    chat = _chat_check(job, next(iter(files.values())))
    if chat["checked"] and not chat["identical"]:
        failures.append(f"chat mode: llama.cpp's prompt tokens differ from ours at token {chat['first_divergence']}")
    return {
        "examples": len(job.heldout.examples),
        "source": job.heldout.source,
        "loss_merged": ref.loss_merged,
        "loss_adapter": ref.loss_adapter,
        "files": results,
        "chat_template": chat,
        "failures": failures,
    }


def _chat_check(job: Job, path: Path) -> dict[str, Any]:
    if job.conversation is None:
        return {"checked": False, "identical": False, "why": "the held-out data has no conversation"}
    return checks.check_chat_template(path, job.tokenizer, job.conversation)
