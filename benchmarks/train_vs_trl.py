"""qlora-kit training vs a plain trl + peft script, same model, same mixed-length chat data, one command per run.

    python benchmarks/train_vs_trl.py                       # CPU: the demo model, 2 runs
    python benchmarks/train_vs_trl.py --model arch:llama-3.1-8b --tokenizer models/demo-base \\
        --max-length 2048 --batch-size 4 --runs 1          # GPU: an 8B-class random-weight shape, no download

Each run is one `qlora-kit bench train` invocation, which measures both sides (each in its own process) and reports
their ratio; the figures go to benchmarks/out/<name>-run<N>/bench.json and bench.md. The toolkit's data cache starts
empty (benchmarks/out/<name>-data-cache), so run 1 includes its tokenization (cold) and later runs load the cache.
The data is synthetic and deterministic: chat rows whose lengths are spread log-uniformly between --min-words and
--max-words words, so a padded batch wastes what packing saves.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the model learns from each example and the loss falls as training goes on while the adapter stays small "
    "quantized weights keep memory low so a large base fits on one card with room for long sequences"
).split()


def mixed_length_rows(count: int, min_words: int, max_words: int, seed: int = 0) -> list[dict]:
    """Chat rows with log-uniform lengths (short prompts, answers from min_words to max_words words)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        answer_words = int(math.exp(rng.uniform(math.log(min_words), math.log(max_words))))
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 20)))
        answer = " ".join(rng.choices(WORDS, k=answer_words))
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows


def write_recipe(args: argparse.Namespace, workdir: Path) -> Path:
    data = workdir / "mixed.jsonl"
    data.write_text(
        "".join(json.dumps(r) + "\n" for r in mixed_length_rows(args.rows, args.min_words, args.max_words))
    )
    model = {"name_or_path": args.model}
    if args.tokenizer:
        model["tokenizer_name_or_path"] = args.tokenizer
    recipe = {
        "model": model,
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(data)}], "max_length": args.max_length},
        "training": {
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": 2e-4,
            **({"optim": args.optim} if args.optim else {}),
        },
    }
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "demo-base"), help="model folder or arch:NAME")
    parser.add_argument("--tokenizer", help="tokenizer folder (needed for arch:NAME)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--optim", help="training.optim for both sides, e.g. paged_adamw_8bit on GPU")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=300)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--name", default="train_vs_trl")
    args = parser.parse_args()

    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(args, out)
    data_cache = out / f"{args.name}-data-cache"
    shutil.rmtree(data_cache, ignore_errors=True)
    for run in range(1, args.runs + 1):
        target = out / f"{args.name}-run{run}"
        command = [
            sys.executable,
            "-m",
            "qlora_kit",
            "bench",
            "train",
            str(recipe),
            f"data.cache_dir={data_cache}",
            "--warmup-steps",
            str(args.warmup_steps),
            "--steps",
            str(args.steps),
            "--output-dir",
            str(target),
            "--force",
        ]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True)
        ratios = json.loads((target / "bench.json").read_text())["ratios"]
        cache = "cold data cache" if run == 1 else "data cache loaded"
        figures = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if v is not None)
        print(f"run {run} ({cache}): {figures}", flush=True)


if __name__ == "__main__":
    main()
