"""qlora-kit DPO beside a plain trl DPOTrainer script: same 4-bit model, LoRA, data and steps, in one run.

Each side runs in its own process (so peak memory is its own) and reports steps/s, peak resident memory and the
held-out reward accuracy: the share of held-out pairs whose chosen answer gets the higher DPO implicit reward
beta * (logp_policy - logp_reference), the reference being the adapter-disabled base on both sides.

    python benchmarks/preference.py --steps 30        # from the repository root; prints a markdown table
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def toolkit(args) -> dict:
    from qlora_kit.preference import train
    from qlora_kit.recipe import validate

    recipe = validate(
        {
            "method": "dpo",
            "model": {"name_or_path": args.model},
            "lora": LORA,
            "data": {"train": [{"path": args.train}], "eval": {"path": args.eval}, "max_length": args.max_length},
            "training": {**common(args), "gradient_checkpointing": False},
            "eval": {"batch_size": args.batch},
        }
    )
    with tempfile.TemporaryDirectory() as scratch:
        metrics = train(recipe, Path(scratch) / "run").metrics
    return {
        "steps_per_s": metrics["steps"] / metrics["train_runtime_s"],
        "reward_accuracy": metrics["preference_comparison"]["tuned"]["reward_accuracy"],
        "train_loss_last": metrics["train_loss_last"],
    }


def common(args) -> dict:
    return {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "learning_rate": args.lr,
        "beta": 0.1,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "seed": 42,
    }


def baseline(args) -> dict:
    """What a user writes with trl alone (its documented QLoRA + peft_config path)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=torch.float32)
    data = load_dataset("json", data_files={"train": args.train, "eval": args.eval})
    with tempfile.TemporaryDirectory() as scratch:
        config = DPOConfig(
            output_dir=scratch,
            **common(args),
            max_length=args.max_length,
            use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=False,
            per_device_eval_batch_size=args.batch,
        )
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=data["train"],
            eval_dataset=data["eval"],
            processing_class=tokenizer,
            peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
        )
        started = time.perf_counter()
        trainer.train()
        runtime = time.perf_counter() - started
        evaluation = trainer.evaluate()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "steps_per_s": trainer.state.global_step / runtime,
        "reward_accuracy": evaluation["eval_rewards/accuracies"],
        "train_loss_last": losses[-1],
    }


def run_side(side: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, *argv, "--side", side, "--json", out.name], check=True)
        return json.loads(Path(out.name).read_text())


def table(results: dict[str, dict]) -> str:
    lines = [
        "| side | steps/s | peak RSS (MiB) | final train loss | held-out reward accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for side, r in results.items():
        lines.append(
            f"| {side} | {r['steps_per_s']:.3f} | {r['peak_rss_mib']:.0f} | {r['train_loss_last']:.4f} | "
            f"{r['reward_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/demo-base")
    parser.add_argument("--train", default="data/demo/preference_train.jsonl")
    parser.add_argument("--eval", default="data/demo/preference_eval.jsonl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--side", choices=["toolkit", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        result = toolkit(args) if args.side == "toolkit" else baseline(args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        Path(args.json).write_text(json.dumps(result))
        return
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results = {"qlora-kit": run_side("toolkit", forwarded), "plain trl DPOTrainer": run_side("baseline", forwarded)}
    print(table(results))


if __name__ == "__main__":
    main()
