"""Interleaved A/B of qlora-kit's packed training step: one process, the same packed batches, variants in turn.

    python benchmarks/packed_step.py                                  # loss: trl's chunked head vs the model's own
    python benchmarks/packed_step.py --variants sdpa eager one-row    # attention kernels and batch layouts
    python benchmarks/packed_step.py --profile model-loss             # torch profiler table of one variant
    python benchmarks/packed_step.py --variants sdpa one-row flash-one-row model.attn_implementation=sdpa  # a GPU

The trainer is built by qlora-kit's own path (``make_trainer``) for the recipe (default recipes/demo.yaml: packing
on, max length 128, batch 8), so the baseline is exactly what `qlora-kit train` runs. Each round runs every variant
on the same --batches packed batches (collated afresh by the variant's collator, so the collator is timed too): one
step is forward, loss, backward and the AdamW update. Rounds alternate the variants, so a busy machine slows all of
them alike; the first round is a warm-up and is not counted. Prints the median and best step time of each variant
and each variant's speed relative to the first.

Variants (each sets everything it depends on, so the order does not matter):
  trl-loss    trl's chunked LM head (log-probs, entropy and top-1 in tiles) with the separate-rows collator
  model-loss  the model's own cross-entropy (what qlora-kit picks when the logits are small), separate rows, sdpa
  sdpa        = model-loss, named for comparison with eager
  eager       model-loss with transformers' eager attention (the same per-example mask, as a float bias)
  one-row     model-loss with trl's padding-free collator: the whole batch in one row, position ids restarting at
              each example, so sdpa gets one (rows x length)^2 block-diagonal mask
  flash-one-row  the same row through flash-attention 2, whose variable-length kernel reads the example boundaries
              from the position ids (needs the flash-attn package and a GPU it supports)
  no-dropout  model-loss with the LoRA dropout set to 0 (not a change to ship: it shows what the dropout costs)
  wide-draws  model-loss with each LoRA dropout mask made from 64-bit random integers read as four 16-bit ones (a
              quarter of the generator calls; the drop rate rounded to 1/65,536), to measure what a cheaper CPU mask
              would buy: an experiment, not what qlora-kit trains with
  compiled-dropout  model-loss with each LoRA dropout compiled by torch.compile (inductor draws its own random
              numbers in generated code): whether the compiler's generator is a cheaper CPU mask; an experiment
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build(recipe_path: Path, overrides: list[str], workdir: Path):
    from qlora_kit.recipe import load_recipe

    settings = ["training.save_strategy=no", "training.report_to=none", "training.disable_tqdm=true"]
    return build_from_recipe(load_recipe(str(recipe_path), [*settings, *overrides]), workdir)


def build_from_recipe(recipe, workdir: Path):
    """qlora-kit's own trainer and model for ``recipe``, ready for single steps outside Trainer's loop."""
    from transformers import set_seed

    from qlora_kit import data as data_stage
    from qlora_kit import model as model_stage
    from qlora_kit import tokenizer as tokenizer_rules
    from qlora_kit.recipe import training_args
    from qlora_kit.train import make_trainer

    set_seed(training_args(recipe)["seed"])
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    prepared = dataclasses.replace(data_stage.build_datasets(recipe, tokenizer), eval=None)
    model = model_stage.attach_lora(model_stage.load_base_model(recipe, tokenizer), recipe)
    trainer = make_trainer(recipe, model, tokenizer, prepared, workdir)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this script bypasses
    model.train()
    return trainer, model


def variants(trainer, model) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    separate = trainer.data_collator
    one_row = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id, padding_free=True)
    backbone = model.get_base_model()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    dropout_p = dropouts[0].p if dropouts else 0.0
    own_loss = trainer.full_logits_loss  # the loss qlora-kit picked for this model and batch (see full_logits_fit)

    def setting(full_loss=None, collator=separate, kernel="sdpa", dropout=dropout_p, wide_draws=False, compiled=False):
        full_loss = own_loss if full_loss is None else full_loss

        def apply():
            trainer.full_logits_loss = full_loss
            trainer.data_collator = collator
            backbone.set_attn_implementation(kernel)
            for module in dropouts:
                module.p = dropout
                if wide_draws:
                    module.forward = wide_draw_dropout(module)
                elif compiled:
                    module.forward = compiled_dropout(module)
                else:
                    module.__dict__.pop("forward", None)  # back to nn.Dropout's own forward

        return apply

    return {
        "trl-loss": setting(full_loss=False),
        "model-loss": setting(full_loss=True),
        "sdpa": setting(),
        "eager": setting(kernel="eager"),
        "one-row": setting(collator=one_row),
        "flash-one-row": setting(collator=one_row, kernel="flash_attention_2"),
        "no-dropout": setting(dropout=0.0),
        "wide-draws": setting(wide_draws=True),
        "compiled-dropout": setting(compiled=True),
    }


def wide_draw_dropout(module: torch.nn.Dropout):
    """Dropout whose mask takes one generator call per four elements: 64-bit draws read as 16-bit integers."""
    threshold = round(module.p * 65536) - 32768  # int16 values are uniform over [-32768, 32767]
    keep_scale = 1.0 / (1.0 - (threshold + 32768) / 65536)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return x
        count = x.numel()
        draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:count]
        return x * (draws.view(x.shape) >= threshold) * keep_scale

    return forward


def compiled_dropout(module: torch.nn.Dropout):
    """The module's dropout through torch.compile, one compiled function for every shape (dynamic)."""
    compiled = torch.compile(torch.nn.functional.dropout, dynamic=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return compiled(x, module.p, module.training)

    return forward


def flash_attention_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return torch.cuda.is_available() and is_flash_attn_2_available()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU step is timed when its kernels finish, not when they are queued


def step(trainer, model, examples) -> float:
    """One optimizer step on freshly collated examples; returns its wall time in seconds."""
    _sync()
    started = time.perf_counter()
    inputs = trainer._prepare_inputs(trainer.data_collator(examples))
    trained = int((inputs["labels"][:, 1:] != -100).sum())
    trainer.training_step(model, inputs, torch.tensor(trained))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    _sync()
    return time.perf_counter() - started


def packed_batches(trainer, count: int) -> list[list[dict]]:
    """The first ``count`` batches of packed rows, as the trainer's dataloader would group them (in order)."""
    size, data = trainer.args.per_device_train_batch_size, trainer.train_dataset
    return [[data[i] for i in range(b * size, (b + 1) * size)] for b in range(count)]


def interleaved(trainer, model, names: list[str], batches: list, rounds: int) -> dict[str, dict]:
    """Each variant in turn on the same batches, ``rounds`` times after a warm-up round: its step times (seconds)
    and, on a GPU, the peak memory its steps reached (bytes)."""
    settings = variants(trainer, model)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, int] = dict.fromkeys(names, 0)
    for round_ in range(rounds + 1):
        for name in names:
            settings[name]()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            measured = [step(trainer, model, examples) for examples in batches]
            if round_ > 0:
                times[name].extend(measured)
                if torch.cuda.is_available():
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
    return {name: {"seconds": times[name], "peak_bytes": peaks[name] or None} for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    parser.add_argument("--variants", nargs="+", default=["trl-loss", "model-loss"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", metavar="VARIANT", help="print a torch profiler table of 5 steps instead")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="qlora-kit-packed-step-") as workdir:
        trainer, model = build(args.recipe, args.overrides, Path(workdir))
    batches = packed_batches(trainer, args.batches)
    if args.profile:
        profile(trainer, model, variants(trainer, model)[args.profile], batches)
        return
    if "flash-one-row" in args.variants and not flash_attention_available():
        parser.error("flash-one-row needs a GPU and the flash-attn package")
    measured = interleaved(trainer, model, args.variants, batches, args.rounds)
    times = {name: figures["seconds"] for name, figures in measured.items()}
    tokens = statistics.mean(sum(len(e["input_ids"]) for e in examples) for examples in batches)
    print(f"{args.rounds} rounds x {args.batches} batches, {args.threads} threads, {tokens:.0f} input tokens/step")
    first = statistics.median(times[args.variants[0]])
    for name in args.variants:
        median = statistics.median(times[name])
        print(
            f"{name:>11}: median {1000 * median:6.1f} ms  best {1000 * min(times[name]):6.1f} ms  "
            f"{tokens / median:7,.0f} input tokens/s  speed vs {args.variants[0]} {first / median:.3f}x"
        )


def profile(trainer, model, apply, batches) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    apply()
    for examples in batches[:2]:
        step(trainer, model, examples)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for examples in batches[:5]:
            step(trainer, model, examples)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
