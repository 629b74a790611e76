"""qlora-kit DPO beside a plain trl DPOTrainer script and beside qlora-kit SFT: same 4-bit model, LoRA, data and
steps, in one run.

Each side runs in its own process (so peak memory is its own) and reports steps/s, peak resident memory (and its rise
above the process's memory once its libraries are imported, which is what the model, data and training add) and the
held-out reward accuracy: the share of held-out pairs whose chosen answer gets the higher DPO implicit reward
beta * (logp_policy - logp_reference), the reference being the adapter-disabled base on both DPO sides.

The SFT side trains on the chosen conversations (prompt + chosen) with the same max_length, no packing, and twice the
examples per step, so it runs as many sequences per step as DPO (a pair is a chosen and a rejected sequence): its
peak memory is the SFT cost DPO's is compared with (DPO's extra is the reference pass, on the same weights).

The plain trl side is ``qlora-kit bench train``'s baseline (qlora_kit.bench.plain). For steps/s, tokens/s and peak
memory of any preference method (DPO, ORPO, KTO, SimPO) beside plain trl, use ``qlora-kit bench train RECIPE``; this
script adds what bench leaves to evaluation: held-out reward accuracy, and DPO's memory against SFT's.

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


def dpo_recipe(args):
    """The DPO recipe both DPO sides run: qlora-kit trains it, qlora_kit.bench.plain hands it to trl by hand."""
    from qlora_kit.recipe import validate

    return validate(
        {
            "method": "dpo",
            "model": {"name_or_path": args.model},
            "lora": LORA,
            "data": {"train": [{"path": args.train}], "eval": {"path": args.eval}, "max_length": args.max_length},
            "training": {**common(args), "gradient_checkpointing": False},
            "eval": {"batch_size": args.batch},
        }
    )


def toolkit(args) -> dict:
    from qlora_kit.preference import train

    with tempfile.TemporaryDirectory() as scratch:
        metrics = train(dpo_recipe(args), Path(scratch) / "run").metrics
    return {
        "steps_per_s": metrics["steps"] / metrics["train_runtime_s"],
        "reward_accuracy": metrics["preference_comparison"]["tuned"]["reward_accuracy"],
        "train_loss_last": metrics["train_loss_last"],
    }


def toolkit_sft(args) -> dict:
    from qlora_kit.recipe import validate
    from qlora_kit.train import train

    with tempfile.TemporaryDirectory() as scratch:
        paths = {}
        for split in ("train", "eval"):
            pairs = [json.loads(line) for line in Path(getattr(args, split)).read_text().splitlines() if line.strip()]
            rows = [{"messages": pair["prompt"] + pair["chosen"]} for pair in pairs]
            paths[split] = Path(scratch) / f"{split}.jsonl"
            paths[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
        training = {k: v for k, v in common(args).items() if k != "beta"}
        recipe = validate(
            {
                "model": {"name_or_path": args.model},
                "lora": LORA,
                "data": {
                    "train": [{"path": str(paths["train"])}],
                    "eval": {"path": str(paths["eval"])},
                    "max_length": args.max_length,
                    "cache": False,
                },
                "training": {
                    **training,
                    "per_device_train_batch_size": 2 * args.batch,  # as many sequences as DPO's pairs hold
                    "packing": False,
                    "gradient_checkpointing": False,
                },
                "eval": {"batch_size": args.batch, "num_samples": 0},
            }
        )
        metrics = train(recipe, Path(scratch) / "run").metrics
    return {
        "steps_per_s": metrics["steps"] / metrics["train_runtime_s"],
        "reward_accuracy": None,
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
    """What a user writes with trl alone (its documented QLoRA + peft_config path): the baseline side of
    ``qlora-kit bench train`` (qlora_kit.bench.plain), with the held-out pairs for trl's own evaluation."""
    from qlora_kit.bench import plain

    recipe = dpo_recipe(args)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = plain.preference_trainer(
            recipe, {"per_device_eval_batch_size": args.batch}, Path(scratch), plain.preference_rows(recipe, "eval")
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
        "| side | steps/s | peak RSS (MiB) | peak RSS rise (MiB) | final train loss | held-out reward accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for side, r in results.items():
        accuracy = "–" if r["reward_accuracy"] is None else f"{r['reward_accuracy']:.3f}"
        lines.append(
            f"| {side} | {r['steps_per_s']:.3f} | {r['peak_rss_mib']:.0f} | {r['peak_rise_mib']:.0f} | "
            f"{r['train_loss_last']:.4f} | {accuracy} |"
        )
    dpo, sft = results["qlora-kit DPO"], results["qlora-kit SFT"]
    lines += [
        "",
        f"qlora-kit DPO / SFT peak RSS: {dpo['peak_rss_mib'] / sft['peak_rss_mib']:.2f}x; above imports: "
        f"{dpo['peak_rise_mib'] / sft['peak_rise_mib']:.2f}x",
    ]
    return "\n".join(lines)


def resident_mib() -> float:
    """This process's resident memory now (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def import_libraries() -> None:
    """What every side imports, so that the memory a side adds above it is its model, data and training."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import qlora_kit.bench.plain  # noqa: F401
    import qlora_kit.preference  # noqa: F401
    import qlora_kit.train  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/demo-base")
    parser.add_argument("--train", default="data/demo/preference_train.jsonl")
    parser.add_argument("--eval", default="data/demo/preference_eval.jsonl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        import_libraries()
        started = resident_mib()
        result = SIDES[args.side][1](args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        result["peak_rise_mib"] = result["peak_rss_mib"] - started
        Path(args.json).write_text(json.dumps(result))
        return
    forwarded = list(argv if argv is not None else sys.argv[1:])
    print(table({label: run_side(side, forwarded) for side, (label, _) in SIDES.items()}))


SIDES = {
    "toolkit": ("qlora-kit DPO", toolkit),
    "baseline": ("plain trl DPOTrainer", baseline),
    "sft": ("qlora-kit SFT", toolkit_sft),
}


if __name__ == "__main__":
    main()
