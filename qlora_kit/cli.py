"""The command line: parse, call one stage, show the result. User mistakes exit 2 with one ``error:`` line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from qlora_kit.checkpoints import TrainingStopped
from qlora_kit.errors import UserError


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a YAML recipe")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=5"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-kit", description="QLoRA fine-tuning from one YAML recipe.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check a recipe and print it resolved")
    _add_recipe_args(validate)

    train = commands.add_parser("train", help="fine-tune: 4-bit base + LoRA with trl's SFTTrainer")
    _add_recipe_args(train)
    train.add_argument("--output-dir", help="run directory (default: the recipe's output_dir)")
    train.add_argument("--force", action="store_true", help="replace an existing run directory")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue an unfinished run from its latest checkpoint, or from the checkpoint at PATH",
    )
    train.add_argument(
        "--accelerate-profile",
        metavar="NAME",
        help="launch under an accelerate profile: single_gpu, ddp, fsdp_qlora, zero3, multi_node "
        "(recipes/accelerate) or a config path; overrides launch.accelerate_profile",
    )

    data = commands.add_parser("data", help="prepare the data; show examples with the trained tokens, and statistics")
    _add_recipe_args(data)
    data.add_argument("--examples", type=int, default=3, metavar="N", help="rendered examples to show (default 3)")
    data.add_argument("--plain", action="store_true", help="mark trained tokens with [[...]] instead of colour")

    merge = commands.add_parser("merge", help="merge a run's adapter into its base: a plain, verified model")
    merge.add_argument("run_dir", help="run directory written by `qlora-kit train`")
    merge.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="merge fields (strategy=original, dtype=bfloat16, verify=false) or dotted recipe keys",
    )
    merge.add_argument("--output", help="output folder (default: RUN_DIR/merged)")
    merge.add_argument("--force", action="store_true", help="replace an existing output folder")

    evaluate = commands.add_parser("eval", help="compare base, adapter and merged model on the held-out data")
    evaluate.add_argument("run_dir", help="run directory written by qlora-kit train")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. eval.batch_size=4")
    evaluate.add_argument("--merged", help="merged model folder (default: RUN_DIR/merged when it exists)")
    evaluate.add_argument("--force", action="store_true", help="replace an existing evaluation in the run directory")
    _add_plan_parser(commands)
    _add_bench_parser(commands)
    return parser


def _add_plan_parser(commands) -> None:
    plan = commands.add_parser("plan", help="predict peak training memory and say whether it fits")
    _add_recipe_args(plan)
    plan.add_argument(
        "--gpu-memory", help="memory to fit in, e.g. 80GiB, 24GB (default: this machine's GPU, else 80GiB)"
    )


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="measure training or generation speed and memory")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="KIND")
    train = kinds.add_parser("train", help="tokens/s, step time, peak memory: qlora-kit beside a plain trl script")
    _add_recipe_args(train)
    train.add_argument("--warmup-steps", type=int, default=3, help="steps run before measuring (default 3)")
    train.add_argument("--steps", type=int, default=10, help="steps measured after warm-up (default 10)")
    train.add_argument("--no-baseline", dest="baseline", action="store_false", help="measure qlora-kit only")
    train.add_argument("--output-dir", help="where bench.json and bench.md go (default runs/bench/<recipe>)")
    train.add_argument("--force", action="store_true", help="replace an existing output directory")
    train.add_argument("--side", choices=["toolkit", "baseline"], help=argparse.SUPPRESS)
    train.add_argument("--json", help=argparse.SUPPRESS)
    generate = kinds.add_parser("generate", help="generation latency and throughput: base, adapter, merged")
    generate.add_argument("path", help="a run directory (recipe.yaml + adapter/, merged/ if any) or a model folder")
    generate.add_argument("--batch-sizes", default="1,4,8", help="comma-separated batch sizes (default 1,4,8)")
    generate.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (default 64)")
    generate.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    generate.add_argument("--repeats", type=int, default=2, help="timed repeats, best kept (default 2)")
    generate.add_argument("--output-dir", help="where bench.json and bench.md go (default runs/bench/<name>-generate)")
    generate.add_argument("--force", action="store_true", help="replace an existing output directory")


# ---------------------------------------------------------------------------------------------------------------
# Commands


def cmd_validate(args: argparse.Namespace) -> int:
    from qlora_kit.recipe import load_recipe, resolved_dict, to_yaml

    recipe = load_recipe(args.recipe, args.overrides)
    sys.stdout.write(to_yaml(resolved_dict(recipe)))
    _console().print(f"[green]ok[/green]: {args.recipe} is a valid recipe", style=None)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from qlora_kit.recipe import load_recipe
    from qlora_kit.train import train

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides, args.resume = [*args.overrides, args.resume], True  # `--resume key=value`: bare --resume
    recipe = load_recipe(args.recipe, args.overrides)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    if args.accelerate_profile:
        recipe.launch.accelerate_profile = args.accelerate_profile
    if recipe.launch.accelerate_profile:
        from qlora_kit.launch import launch_profile

        launched = launch_profile(recipe, args.argv)
        if launched is not None:  # this process started the workers and waited for them
            return launched
    console = _console()
    if _is_main_process():
        console.rule(f"qlora-kit train · {args.recipe}")
        model, run = recipe.model.name_or_path, recipe.output_dir
        console.print(f"model [bold]{model}[/bold] → run directory [bold]{run}[/bold]")
    result = train(
        recipe, Path(recipe.output_dir), force=args.force, progress=TrainProgress(console), resume=args.resume
    )
    return 0 if result.run_dir.exists() or not _is_main_process() else 1


def cmd_data(args: argparse.Namespace) -> int:
    from qlora_kit.data import build_datasets, preview
    from qlora_kit.launch import packs
    from qlora_kit.recipe import load_recipe, training_args
    from qlora_kit.tokenizer import load_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    console = _console()
    plain = args.plain or not console.is_terminal
    tokenizer = load_tokenizer(recipe)
    prepared = build_datasets(recipe, tokenizer, show_progress=console.is_terminal)
    preview.show_examples(console, tokenizer, prepared, args.examples, plain)
    training = training_args(recipe)
    preview.show_stats(
        console,
        prepared,
        recipe.data.max_length,
        training["per_device_train_batch_size"],
        training.get("packing_strategy", "bfd"),
        packs(recipe),
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from qlora_kit.merge import VerificationFailed, merge_run
    from qlora_kit.merge.console import MergeProgress

    console = _console()
    console.rule(f"qlora-kit merge · {args.run_dir}")
    progress = MergeProgress(console)
    try:
        merge_run(Path(args.run_dir), args.output and Path(args.output), args.overrides, args.force, progress)
    except VerificationFailed as exc:
        progress.show_verification(exc.report["verification"], exc.report["strategy"])
        print(
            f"error: verification failed: {exc}; the unverified merge was not published (kept for inspection in "
            f"{exc.kept})",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from qlora_kit.evaluate.stage import run_eval

    console = _console()
    console.rule(f"qlora-kit eval · {args.run_dir}")
    with EvalProgress(console) as progress:
        result = run_eval(
            Path(args.run_dir),
            args.overrides,
            force=args.force,
            merged_dir=Path(args.merged) if args.merged else None,
            progress=progress,
            log=console.print,
        )
    show_eval(console, result.report)
    return 0


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class TrainProgress:
    """Turns the training stage's milestones into terminal output."""

    def __init__(self, console) -> None:
        self.console = console

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        if not _is_main_process():
            return
        getattr(self, f"on_{event}", lambda _: None)(payload)

    def on_data(self, stats: dict[str, Any]) -> None:
        rows = sum(stats["rows"].values())
        share = stats["trained_tokens"] / max(stats["tokens"], 1)
        self.console.print(
            f"data: {rows} rows ({', '.join(f'{k}: {v}' for k, v in stats['formats'].items())}), "
            f"{stats['tokens']:,} tokens, {share:.0%} trained on; truncated {stats['truncated']}, "
            f"dropped {stats['dropped_too_long'] + stats['dropped_no_target']}; cache {stats.get('cache', 'off')}"
            + (f"; packing efficiency {stats['packing']['efficiency']:.0%}" if stats.get("packing") else "")
        )

    def on_model(self, info: dict[str, Any]) -> None:
        self.console.print(
            f"model: {info['total']:,} parameters, {info['trainable']:,} trainable LoRA "
            f"({info['trainable'] / info['total']:.2%}), compute dtype {info['dtype']}"
        )

    def on_resume(self, info: dict[str, Any]) -> None:
        self.console.print(f"resuming from {info['checkpoint']} (optimizer, scheduler, RNG and data position)")

    def on_done(self, metrics: dict[str, Any]) -> None:
        from rich.table import Table

        console = self.console
        console.print(
            f"trained {metrics['steps']} steps in {metrics['train_runtime_s']:.1f}s: loss "
            f"{metrics['train_loss_first']:.3f} → {metrics['train_loss_last']:.3f}, "
            f"{metrics['tokens_per_second']:.0f} trained tokens/s, "
            f"peak memory {metrics['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
        comparison = metrics.get("comparison")
        if comparison:
            table = Table(title="held-out: base vs fine-tuned")
            table.add_column("metric")
            table.add_column("base", justify="right")
            table.add_column("fine-tuned", justify="right")
            for key in ("eval_loss", "eval_perplexity", "exact_match"):
                if f"{key}_base" in comparison:
                    table.add_row(key, f"{comparison[f'{key}_base']:.3f}", f"{comparison[f'{key}_tuned']:.3f}")
            console.print(table)
            samples = Table(title="held-out generations", show_lines=True)
            for column in ("prompt", "reference", "base", "fine-tuned"):
                samples.add_column(column, overflow="fold")
            for sample in comparison["samples"]:
                samples.add_row(sample["prompt"][-80:], sample["reference"], sample["base"], sample["tuned"])
            console.print(samples)
        console.print(f"adapter: [bold]{metrics['run_dir']}/adapter[/bold]  (metrics.json, loss_curve.png beside it)")


class EvalProgress:
    """One rich progress bar per (model, phase): called with a description and a total, returns an advance function."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )

    def __enter__(self) -> EvalProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def __call__(self, description: str, total: int):
        task = self.bars.add_task(description, total=total)
        return lambda done: self.bars.advance(task, done)


def show_eval(console, report: dict[str, Any]) -> None:
    from rich.table import Table

    from qlora_kit.evaluate.report import higher_is_better

    models = list(report["metrics"])
    table = Table(title="held-out: " + " vs ".join(models))
    table.add_column("metric")
    for name in models:
        table.add_column(name, justify="right")
    for name in models[1:]:
        table.add_column(f"Δ {name}", justify="right")
    for key in dict.fromkeys(k for m in models for k in report["metrics"][m]):
        cells = [f"{report['metrics'][m][key]:.4g}" if key in report["metrics"][m] else "–" for m in models]
        for name in models[1:]:
            delta = report["deltas"][name].get(key)
            good = delta is not None and delta != 0 and (delta > 0) == higher_is_better(key)
            cells.append("–" if delta is None else f"[{'green' if good else 'red'}]{delta:+.4g}[/]")
        table.add_row(key if higher_is_better(key) else f"{key} ↓", *cells)
    console.print(table)
    console.print(f"report: [bold]{report['run_dir']}[/bold]/eval.json, eval.md, eval.png, samples.jsonl")


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from qlora_kit.plan import GIB, parse_memory, plan_recipe
    from qlora_kit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.gpu_memory:
        budget = parse_memory(args.gpu_memory)
    else:
        budget = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * GIB
    # The planner sizes GPU runs (bf16 compute); on a machine without one it assumes an 80 GiB card unless told.
    result = plan_recipe(recipe, budget, on_gpu=True)
    if not args.gpu_memory and not torch.cuda.is_available():
        result.notes.append("no GPU here: checked against 80 GiB; pass --gpu-memory for your card")
    console = _console()
    console.print(f"plan for [bold]{args.recipe}[/bold]: {result.model}, batch {result.batch_size} x {result.length}")
    for name, value in result.parts.items():
        console.print(f"  {name:<22}{value / GIB:>9.2f} GiB")
    console.print(
        f"  {'total':<22}{result.total / GIB:>9.2f} GiB  (budget {result.budget_bytes / GIB:.2f} GiB "
        f"after 1 GiB headroom)"
    )
    console.print("[green]fits[/green]" if result.fits else "[red]does not fit[/red]")
    for line in result.suggestions + result.notes:
        console.print(f"  {line}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from qlora_kit import bench

    console = _console()
    if args.bench_command == "train" and args.side:
        if not args.json:
            raise UserError("--side needs --json PATH for the measurements")
        bench.run_side(args.side, args.recipe, args.overrides, args.warmup_steps, args.steps, Path(args.json))
        return 0
    from qlora_kit.train import check_run_dir

    if args.bench_command == "train":
        output = Path(args.output_dir or Path("runs") / "bench" / Path(args.recipe).stem)
        check_run_dir(output, args.force)  # before minutes of measuring, not after
        report = bench.bench_train(
            args.recipe, args.overrides, args.warmup_steps, args.steps, args.baseline, progress=console.print
        )
        markdown = bench.train_markdown(report)
    else:
        sizes = _batch_sizes(args.batch_sizes)
        output = Path(args.output_dir or Path("runs") / "bench" / f"{Path(args.path).resolve().name}-generate")
        check_run_dir(output, args.force)
        report = bench.bench_generate(
            args.path, sizes, args.prompt_tokens, args.new_tokens, args.repeats, progress=console.print
        )
        markdown = bench.generate_markdown(report)
    bench.write_report(report, markdown, output, args.force)
    from rich.markdown import Markdown

    console.print(Markdown(markdown))
    console.print(f"written: [bold]{output}/bench.json[/bold] and bench.md")
    return 0


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes: {text!r} is not a comma-separated list of positive integers, e.g. 1,4,8")
    return sizes


COMMANDS = {
    "validate": cmd_validate,
    "train": cmd_train,
    "data": cmd_data,
    "eval": cmd_eval,
    "merge": cmd_merge,
    "plan": cmd_plan,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`train r.yaml --force lora.r=8`): collect the stray ones.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to run the same command under accelerate launch
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
