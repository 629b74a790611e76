"""`bench generate`: latency and throughput of the base, the adapter and the merged model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.bench.measure import machine, peak_memory, sync
from qlora_kit.errors import UserError
from qlora_kit.rundir import is_run, versions

PROMPT_TEXT = "Explain, step by step and in plain words, how a model learns from examples during fine-tuning. "


def generation_models(path: Path):
    """(tokenizer, compute dtype, [(name, model, context factory)]) for a run directory or a model folder."""
    from contextlib import nullcontext

    from peft import PeftModel

    from qlora_kit import model as model_stage
    from qlora_kit.recipe import load_yaml, validate

    if is_run(path):
        recipe = validate(load_yaml(path / "recipe.yaml"), source=str(path / "recipe.yaml"))
        recipe.model.tokenizer_name_or_path = str(path / "adapter")
    elif (path / "config.json").is_file():
        # A model folder alone: the recipe defaults (4-bit NF4, compute dtype by machine) apply; no data is read.
        recipe = validate({"model": {"name_or_path": str(path)}, "data": {"train": [{"path": str(path)}]}})
    else:
        raise UserError(f"{path}: not a run directory (recipe.yaml + adapter/) nor a model folder (config.json)")
    from qlora_kit.resolve import resolve

    resolved = resolve(recipe)
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    base = model_stage.load_base_model(recipe, tokenizer, resolved)
    variants = []
    if (path / "adapter").is_dir():
        adapted = PeftModel.from_pretrained(base, str(path / "adapter"))
        variants += [("base", adapted, adapted.disable_adapter), ("adapter", adapted, nullcontext)]
    else:
        variants.append(("base", base, nullcontext))
    if (path / "merged" / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(
            path / "merged", dtype=resolved.compute_dtype, device_map=resolved.device_map
        )
        variants.append(("merged", merged, nullcontext))
    return tokenizer, resolved.compute_dtype, variants


@torch.no_grad()
def time_generation(model, tokenizer, batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Greedy decoding of exactly ``new_tokens`` tokens for ``batch`` identical-length prompts; best of ``repeats``."""
    ids = tokenizer(PROMPT_TEXT * (prompt_tokens // 8 + 1), add_special_tokens=False)["input_ids"][:prompt_tokens]
    device = next(model.parameters()).device
    inputs = torch.tensor([ids] * batch, device=device)
    mask = torch.ones_like(inputs)

    def run(count: int) -> float:
        sync()
        start = time.perf_counter()
        model.generate(
            input_ids=inputs,
            attention_mask=mask,
            max_new_tokens=count,
            min_new_tokens=count,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        sync()
        return time.perf_counter() - start

    model.eval()
    run(2)  # warm-up: kernels, caches, lazy initialisation
    first = min(run(1) for _ in range(repeats))
    total = min(run(new_tokens) for _ in range(repeats))
    per_token = (total - first) / max(new_tokens - 1, 1)
    return {
        "batch_size": batch,
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "time_to_first_token_s": first,
        "per_token_latency_s": per_token,
        "total_s": total,
        "tokens_per_second": batch * new_tokens / total,
    }


def bench_generate(
    path: str | Path, batch_sizes: list[int], prompt_tokens: int, new_tokens: int, repeats: int = 2, progress=None
) -> dict[str, Any]:
    show = progress or (lambda message: None)
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run directory or a model folder")
    tokenizer, dtype, variants = generation_models(path)
    rows = []
    for name, model, context in variants:
        for batch in batch_sizes:
            show(f"{name}: batch {batch} ...")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with context():
                row = {"model": name, **time_generation(model, tokenizer, batch, prompt_tokens, new_tokens, repeats)}
            row.update(peak_memory())
            rows.append(row)
    return {
        "path": str(path),
        "dtype": str(dtype).removeprefix("torch."),
        "machine": machine(),
        "versions": versions(),
        "results": rows,
    }
