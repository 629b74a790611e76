"""Merge time and peak memory: qlora-kit's streaming merge vs peft's merge_and_unload, on the same sharded model.

Builds a random-weight Llama checkpoint in shards (float32, a few hundred MB by default) and a LoRA adapter for it,
then runs each merge in a fresh process and measures wall time and peak resident memory (VmHWM) above the process's
footprint after its imports:

- ``streaming (dequantized)``: ``qlora-kit merge`` with the default strategy (each 4-bit-quantized weight is
  quantized and dequantized as bitsandbytes did at load time, then the LoRA update added), shard by shard;
- ``streaming (original)``: the same with the full-precision base (no quantize/dequantize round trip);
- ``peft merge_and_unload``: the usual recipe: load the full-precision base, ``PeftModel.from_pretrained``,
  ``merge_and_unload()``, ``save_pretrained``.

    python benchmarks/merge_memory.py                 # prints a table, appends it to benchmarks/RESULTS.md
    python benchmarks/merge_memory.py --layers 4 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"

MEASURE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    import torch, transformers, peft, bitsandbytes  # every import either merge needs, before the baseline
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    from qlora_kit.merge import merge_run
    run, output, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    baseline = hwm()
    started = time.perf_counter()
    if kind == "peft":
        base = AutoModelForCausalLM.from_pretrained(run.parent / "base", dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(run / "adapter")).merge_and_unload()
        merged.save_pretrained(output)
    else:
        merge_run(run, output, ["verify=false", f"strategy={kind}"])
    print(json.dumps({"seconds": time.perf_counter() - started, "baseline": baseline, "peak": hwm()}))
""")


def build(folder: Path, args: argparse.Namespace) -> Path:
    """A sharded random-weight base, a LoRA adapter with non-zero updates, and a run directory around it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_kit.model import lora_config
    from qlora_kit.recipe import resolved_dict, to_yaml, validate

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "base", max_shard_size=args.shard_size)
    tokenizer.save_pretrained(folder / "base")
    data = folder / "train.jsonl"
    data.write_text(json.dumps({"text": "unused: verification is off"}) + "\n")
    recipe = validate(
        {
            "model": {"name_or_path": str(folder / "base")},
            "lora": {"r": 16},
            "data": {"train": [{"path": str(data)}]},
            "quantization": {"bnb_4bit_compute_dtype": "float32"},
        }
    )
    peft_model = get_peft_model(model, lora_config(recipe))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    run = folder / "run"
    peft_model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    (run / "recipe.yaml").write_text(to_yaml(resolved_dict(recipe)))
    return run


def measure(run: Path, kind: str, output: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(run), str(output), kind], capture_output=True, text=True, env=env, cwd=REPO
    )
    if result.returncode != 0:
        raise SystemExit(f"{kind} merge failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict], model_bytes: int, largest: int) -> str:
    peft = rows["peft merge_and_unload"]
    lines = [
        "| merge | time (s) | peak RSS above imports (MiB) | time vs peft | peak vs peft |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        growth = row["peak"] - row["baseline"]
        lines.append(
            f"| {name} | {row['seconds']:.1f} | {growth / 2**20:,.0f} | "
            f"{row['seconds'] / peft['seconds']:.2f}× | {growth / (peft['peak'] - peft['baseline']):.2f}× |"
        )
    lines.append(f"\nCheckpoint: {model_bytes / 2**20:,.0f} MiB float32, largest shard {largest / 2**20:,.0f} MiB.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(REPO / "models" / "demo-base"))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-size", default="200MB")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        folder = Path(tmp)
        run = build(folder, args)
        shards = list((folder / "base").glob("*.safetensors"))
        model_bytes, largest = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
        rows = {}
        for name, kind in (
            ("streaming (dequantized)", "dequantized"),
            ("streaming (original)", "original"),
            ("peft merge_and_unload", "peft"),
        ):
            rows[name] = measure(run, kind, folder / f"out-{kind}")
            print(f"{name}: {rows[name]['seconds']:.1f}s", file=sys.stderr)
    text = table(rows, model_bytes, largest)
    print(text)
    if not args.no_record:
        command = "python benchmarks/merge_memory.py " + " ".join(sys.argv[1:])
        versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes"))
        header = (
            f"\n## Merge: streaming vs peft merge_and_unload\n\n`{command.strip()}` on {os.cpu_count()}-core CPU "
            f"({platform.machine()}, no GPU); {versions}.\n\n"
        )
        existing = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
        RESULTS.write_text(existing.rstrip("\n") + "\n" + header + text + "\n")


if __name__ == "__main__":
    main()
