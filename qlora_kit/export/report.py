"""export.json (every number), export.md (the tables) and README.md (how to run the files) of an export."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REPORT_NAME = "export.json"


def build(job, files, timings, pre, verification, family, lora, eot, versions, peak) -> dict[str, Any]:
    export = job.recipe.export
    return {
        "complete": not (verification or {}).get("failures"),
        "run_dir": str(job.run_dir),
        "output": str(job.output),
        "format": export.format,
        "adapter_only": export.adapter_only,
        "merged_model": str(job.merged),
        "files": {
            kind: {"file": path.name, "bytes": path.stat().st_size, **timings[kind]} for kind, path in files.items()
        },
        "lora": {"file": lora.name, "bytes": lora.stat().st_size} if lora else None,
        "tokenizer": pre,
        "eot_token_ids": eot,
        "chat_family": family,
        "system_prompt": export.system_prompt,
        "verification": verification,
        "failures": (verification or {}).get("failures", []),
        "peak_memory_bytes": peak,
        "versions": versions,
    }


def _ppl(loss: float | None) -> str:
    return "–" if loss is None else f"{math.exp(loss):.4f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# GGUF export of {result['run_dir']}", ""]
    check = result["verification"]
    if check is None:
        return "\n".join([*lines, "Not verified (export.verify=false).", ""])
    lines += [
        f"Held-out perplexity on {check['examples']} {check['source']} examples: adapter on the 4-bit base "
        f"{_ppl(check['loss_adapter'])}, merged model (transformers) {_ppl(check['loss_merged'])}.",
        "",
        "| file | type | MB | perplexity (llama.cpp) | vs merged | limit | identical greedy generations | limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, row in check["files"].items():
        info = result["files"][kind]
        agreement = row["generation_agreement"]
        lines.append(
            f"| {info['file']} | {kind} | {info['bytes'] / 1e6:.1f} | {row['perplexity']:.4f} | "
            f"{row['perplexity_increase']:+.2%} | +{row['thresholds']['max_perplexity_increase']:.1%} | "
            f"{'–' if agreement is None else f'{agreement:.0%}'} | "
            f"{row['thresholds']['min_generation_agreement']:.0%} |"
        )
    for kind, row in check["files"].items():
        for gen in row["generations"]:
            if not gen["agree"]:
                split = gen["first_divergence"]
                lines.append(
                    f"\n{kind}: first divergence at token {split['token']} of {gen['prompt'][-60:]!r}: merged "
                    f"{split['merged']!r}, GGUF {split['gguf']!r}"
                )
    chat = check["chat_template"]
    verdict = "identical" if chat.get("identical") else f"not checked ({chat.get('why')})"
    if chat.get("checked") and not chat["identical"]:
        verdict = f"different from token {chat['first_divergence']}"
    lines += ["", f"Chat mode: llama.cpp's prompt tokens from the GGUF's chat template vs qlora-kit's: {verdict}."]
    if result["failures"]:
        lines += ["", "Failed: " + "; ".join(result["failures"])]
    return "\n".join(lines) + "\n"


def readme(result: dict[str, Any]) -> str:
    name = Path(result["run_dir"]).resolve().name
    first = next(iter(result["files"].values()))["file"]
    lines = [f"# {name}: GGUF", "", "Files:", ""]
    lines += [f"- `{info['file']}` ({kind}, {info['bytes'] / 1e6:.1f} MB)" for kind, info in result["files"].items()]
    if result["lora"]:
        lora = result["lora"]["file"]
        lines += [f"- `{lora}`: the adapter as a GGUF LoRA; apply it on a `base-*.gguf` above", ""]
        lines += ["Chat in llama.cpp:", "", f"    llama-cli -m {first} --lora {lora} -cnv", ""]
    else:
        lines += ["", "Chat in llama.cpp:", "", f"    llama-cli -m {first} -cnv", ""]
    lines += ["Run with Ollama (the Modelfile carries the chat template, stop tokens and system prompt):", ""]
    lines += [f"    ollama create {name} -f Modelfile && ollama run {name}", ""]
    lines += ["Verification by llama.cpp: see export.md and export.json.", ""]
    return "\n".join(lines)


def write(folder: Path, result: dict[str, Any]) -> None:
    (folder / REPORT_NAME).write_text(json.dumps(result, indent=2) + "\n")
    (folder / "export.md").write_text(markdown(result))
    (folder / "README.md").write_text(readme(result))
