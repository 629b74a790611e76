"""The command line: parse, call one stage, show the result. User mistakes exit 2 with one ``error:`` line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qlora_kit.console import EvalProgress, TrainProgress, is_main_process, show_eval, show_plan
from qlora_kit.errors import TrainingStopped, UserError

REPORT_LINE = (
    "this is a bug in qlora-kit, not a mistake in your input: please report it with the command and the traceback "
    "above (add --debug to see the full chain)"
)


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
    _add_export_parser(commands)
    _add_plan_parser(commands)
    _add_bench_parser(commands)
    return parser


def _add_export_parser(commands) -> None:
    export = commands.add_parser("export", help="write GGUF files for llama.cpp and Ollama, verified by llama.cpp")
    export.add_argument("run_dir", help="run directory written by qlora-kit train (merged first if not yet)")
    export.add_argument("overrides", nargs="*", metavar="key=value", help="export overrides, e.g. verify_examples=8")
    export.add_argument("--format", default="gguf", choices=["gguf"], help="export format (default gguf)")
    export.add_argument("--types", help="comma-separated GGUF types, e.g. f16,q8_0,q4_k_m (default: export.types)")
    export.add_argument("--adapter-only", action="store_true", help="the adapter as a GGUF LoRA, plus its base")
    export.add_argument("--output", help="export folder (default RUN_DIR/gguf, or RUN_DIR/gguf-lora)")
    export.add_argument("--force", action="store_true", help="replace an existing export folder")


def _add_plan_parser(commands) -> None:
    plan = commands.add_parser("plan", help="predict peak training memory and say whether it fits")
    _add_recipe_args(plan)
    plan.add_argument(
        "--memory",
        "--gpu-memory",
        dest="gpu_memory",
        help="GPU memory to fit in, e.g. 80GiB, 24GB (default: this machine's GPU, else 80GiB); the plan also "
        "prints the longest data.max_length that fits it, with and without each memory switch",
    )


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="measure training or generation speed and memory")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="KIND")
    about = (
        "steps/s, tokens/s, peak memory: qlora-kit beside a plain trl script, for SFT and for the preference "
        "methods (dpo, orpo, kto, simpo: trl's DPO, ORPO, KTO or CPO trainer on the raw pairs)"
    )
    train = kinds.add_parser(
        "train",
        help=about,
        description=about + ". A preference step runs the policy on both answers of a pair (and the reference for "
        "dpo and kto), so its tokens/s does not compare with SFT's; see docs/benchmarking.md.",
    )
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
    from qlora_kit.model import model_config_problems
    from qlora_kit.recipe import load_recipe, resolved_dict, to_yaml

    recipe = load_recipe(args.recipe, args.overrides)
    problems = model_config_problems(recipe)  # when the model's config is on this machine: cheap, no weights
    if problems:
        raise UserError(f"{args.recipe} has {len(problems)} problem(s) with its model: " + "; ".join(problems))
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
    if is_main_process():
        console.rule(f"qlora-kit train · {args.recipe}")
        model, run = recipe.model.name_or_path, recipe.output_dir
        console.print(f"model [bold]{model}[/bold] → run directory [bold]{run}[/bold]")
    if recipe.method != "sft":
        from qlora_kit.preference import train
    result = train(
        recipe,
        Path(recipe.output_dir),
        force=args.force,
        progress=TrainProgress(console),
        resume=args.resume,
        inputs={"the recipe file": args.recipe},
    )
    return 0 if result.run_dir.exists() or not is_main_process() else 1


def cmd_data(args: argparse.Namespace) -> int:
    from qlora_kit.data import build_datasets, preview
    from qlora_kit.data.cache import check_writable
    from qlora_kit.recipe import load_recipe, training_args
    from qlora_kit.resolve import resolve
    from qlora_kit.tokenizer import load_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    check_writable(recipe.data)
    console = _console()
    plain = args.plain or not console.is_terminal
    tokenizer = load_tokenizer(recipe)
    if recipe.method != "sft":
        from qlora_kit.data import preference

        preference.show(console, tokenizer, preference.build(recipe, tokenizer), args.examples, plain)
        return 0
    prepared = build_datasets(recipe, tokenizer, show_progress=console.is_terminal)
    preview.show_examples(console, tokenizer, prepared, args.examples, plain)
    training = training_args(recipe)
    preview.show_stats(
        console,
        prepared,
        recipe.data.max_length,
        training["per_device_train_batch_size"],
        training.get("packing_strategy", "bfd"),
        resolve(recipe).packing,
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
        # A 16-bit merge rounds W + BA to the 16-bit grid W already sits on: updates under half a step vanish.
        hint = (
            f"; merge.dtype={exc.report['dtype']} drops weight updates smaller than half its rounding step, "
            "merge.dtype=float32 keeps them"
            if exc.report.get("dtype") in ("bfloat16", "float16")
            else ""
        )
        print(
            f"error: verification failed: {exc}; the unverified merge was not published (kept for inspection in "
            f"{exc.kept}){hint}",
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


def cmd_export(args: argparse.Namespace) -> int:
    from qlora_kit.export import ExportFailed, export_run
    from qlora_kit.export.console import ExportProgress

    overrides = [*args.overrides, f"export.format={args.format}"]
    if args.types:
        overrides.append(f"export.types=[{args.types}]")
    if args.adapter_only:
        overrides.append("export.adapter_only=true")
    console = _console()
    console.rule(f"qlora-kit export · {args.run_dir}")
    progress = ExportProgress(console)
    try:
        export_run(Path(args.run_dir), args.output and Path(args.output), overrides, args.force, progress)
    except ExportFailed as exc:
        progress.on_done(exc.report)
        print(f"error: export verification failed: {exc}; nothing was kept", file=sys.stderr)
        return 1
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from qlora_kit.plan import ASSUMED_GPU, GIB, parse_memory, plan_recipe
    from qlora_kit.recipe import load_recipe
    from qlora_kit.resolve import this_machine

    recipe = load_recipe(args.recipe, args.overrides)
    # The planner sizes GPU runs: this machine's GPU, or an assumed 80 GiB card where there is none.
    machine = this_machine() if this_machine().on_gpu else ASSUMED_GPU
    budget = parse_memory(args.gpu_memory) if args.gpu_memory else machine.memory_bytes or 80 * GIB
    result = plan_recipe(recipe, budget, machine)
    if not args.gpu_memory and not this_machine().on_gpu:
        result.notes.append("no GPU here: checked against 80 GiB; pass --memory for your card")
    show_plan(_console(), args.recipe, result)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from qlora_kit import bench

    console = _console()
    if args.bench_command == "train" and args.side:
        if not args.json:
            raise UserError("--side needs --json PATH for the measurements")
        bench.run_side(args.side, args.recipe, args.overrides, args.warmup_steps, args.steps, Path(args.json))
        return 0
    from qlora_kit import rundir

    if args.bench_command == "train":
        output = Path(args.output_dir or dated_folder(Path("runs") / "bench" / Path(args.recipe).stem))
        rundir.prepare_output(output, args.force, {"the recipe file": args.recipe})  # before minutes of measuring
        report = bench.bench_train(
            args.recipe, args.overrides, args.warmup_steps, args.steps, args.baseline, progress=console.print
        )
        markdown = bench.train_markdown(report)
    else:
        sizes = _batch_sizes(args.batch_sizes)
        output = Path(
            args.output_dir or dated_folder(Path("runs") / "bench" / f"{Path(args.path).resolve().name}-generate")
        )
        rundir.prepare_output(output, args.force, {"the measured model": args.path})
        report = bench.bench_generate(
            args.path, sizes, args.prompt_tokens, args.new_tokens, args.repeats, progress=console.print
        )
        markdown = bench.generate_markdown(report)
    bench.write_report(report, markdown, output, args.force)
    from rich.markdown import Markdown

    console.print(Markdown(markdown))
    console.print(f"written: [bold]{output}/bench.json[/bold] and bench.md")
    return 0


def dated_folder(base: Path) -> Path:
    """A new folder per measurement (base-YYYYmmdd-HHMMSS), so running a benchmark again never meets the last one."""
    from datetime import datetime

    dated = base.with_name(f"{base.name}-{datetime.now():%Y%m%d-%H%M%S}")
    candidates = (dated.with_name(f"{dated.name}-{n}") if n else dated for n in range(1000))
    return next(path for path in candidates if not path.exists())


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
    "export": cmd_export,
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
    except Exception:
        # Not caused by the input (those are UserErrors): show everything a bug report needs.
        if args.debug:
            raise
        import traceback

        traceback.print_exc()
        print(f"error: {REPORT_LINE}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
