"""Generation throughput: batched (left padding, sorted by length) vs one prompt at a time, on the demo model.

Run from the repository root:

    python benchmarks/generation.py                      # models/demo-base, data/demo/eval.jsonl, 4-bit NF4
    python benchmarks/generation.py --model DIR --data FILE --prompts 16 --max-new-tokens 16 --batch-sizes 1 8 16

Every batch size answers the same held-out prompts with greedy decoding through ``qlora_kit.evaluate.generate_ids``
(the code ``qlora-kit eval`` uses), on the 4-bit base loaded by ``qlora_kit.model.load_base_model``. Tokens/s counts
generated tokens up to and including the stop token. The script also checks that every batch size produced the same
answers as one-at-a-time generation. ``--append FILE`` appends the markdown result to FILE (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from qlora_kit import data as data_stage
from qlora_kit import model as model_stage
from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.evaluate.generation import GenerationSettings, encode_prompts, generate_ids
from qlora_kit.recipe import validate

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "demo-base"), help="base model folder")
    parser.add_argument("--data", default=str(REPO / "data" / "demo" / "eval.jsonl"), help="held-out chat data")
    parser.add_argument("--prompts", type=int, default=16, help="how many held-out prompts every mode answers")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--append", help="append the markdown result to this file")
    return parser.parse_args()


def load(args: argparse.Namespace):
    recipe = validate({"model": {"name_or_path": args.model}, "data": {"train": [{"path": args.data}]}})
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    model = model_stage.load_base_model(recipe, tokenizer)
    rows = data_stage.read_formatted(recipe.data.train[0], "data")
    prompts = [prompt for prompt, _ in data_stage.eval_prompts(rows, tokenizer, args.prompts)]
    return model, tokenizer, prompts


def measure(model, tokenizer, encoded: list[list[int]], batch_size: int, max_new_tokens: int):
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    started = time.perf_counter()
    outputs = generate_ids(model, tokenizer, encoded, settings)
    seconds = time.perf_counter() - started
    # generate_ids drops the stop token; it was generated all the same, so count it where the answer stopped early.
    tokens = sum(min(len(ids) + 1, max_new_tokens) for ids in outputs)
    return outputs, tokens, seconds


def main() -> int:
    args = parse_args()
    model, tokenizer, prompts = load(args)
    encoded = encode_prompts(tokenizer, prompts)
    generate_ids(model, tokenizer, encoded[:2], GenerationSettings(max_new_tokens=2, batch_size=2))  # warm-up
    results, reference = [], None
    for batch_size in args.batch_sizes:
        outputs, tokens, seconds = measure(model, tokenizer, encoded, batch_size, args.max_new_tokens)
        reference = reference if reference is not None else outputs
        results.append(
            {
                "batch_size": batch_size,
                "tokens": tokens,
                "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1),
                "same_as_first": outputs == reference,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    report = markdown(args, prompts, results)
    print(report)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as handle:
            handle.write(report + "\n")
    return 0


def markdown(args: argparse.Namespace, prompts: list[str], results: list[dict]) -> str:
    first = results[0]["tokens_per_s"]
    lines = [
        f"## Generation: batched vs one at a time ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Command: `python {' '.join(sys.argv)}`",
        f"- Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; "
        f"torch threads {torch.get_num_threads()}",
        f"- Versions: torch {torch.__version__}, transformers {version('transformers')}, "
        f"bitsandbytes {version('bitsandbytes')}, peft {version('peft')}",
        f"- Work: {len(prompts)} held-out prompts from {args.data}, greedy, up to {args.max_new_tokens} new tokens, "
        "4-bit NF4 base (double quant, float32 compute)",
        "",
        "| batch size | generated tokens | seconds | tokens/s | speed-up vs first | same answers |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['batch_size']} | {row['tokens']} | {row['seconds']} | {row['tokens_per_s']} | "
            f"{row['tokens_per_s'] / first:.1f}× | {'yes' if row['same_as_first'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
