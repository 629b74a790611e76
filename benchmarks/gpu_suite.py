"""The GPU suite: one command, every number the GPU targets need, written to a dated section of benchmarks/RESULTS.md.

    make bench-gpu          # = python benchmarks/gpu_suite.py: one NVIDIA GPU, the Llama-3.1-8B shape
    make bench-gpu-dry      # = python benchmarks/gpu_suite.py --dry-run: the same stages on CPU, a tiny shape

Stages, all on random weights of the shape (no download; qlora_kit/bench/shapes.py builds and caches them):

1. training: qlora-kit beside a plain trl + peft script (`qlora-kit bench train`, each side in its own process) on
   the same mixed-length chat data (benchmarks/train_vs_trl.py writes it): tokens/s, MFU, peak VRAM, and the
   planner's prediction for each side;
2. the long-context ladder (benchmarks/long_context.py): peak memory of one step per length with and without each
   memory switch, beside the planner;
3. packed layouts (benchmarks/packed_step.py): qlora-kit's training step on the same packed batches of stage 1's
   data with each contamination-free layout the GPU can run: sdpa with one packed row per batch slot (what qlora-kit
   picks for sdpa), sdpa with the whole batch in one row, and flash-attention's variable-length kernel on one row
   when the flash-attn package is installed; step time, tokens/s and peak memory per layout (in this process, after
   the ladder's own processes, so what it leaves in GPU memory never crowds them);
4. a short qlora-kit run, merged and verified (`qlora-kit merge`'s logit, loss and generation checks);
5. qlora-kit beside the peers (benchmarks/peers.py on the GPU): the demo job (recipes/demo.yaml, the committed demo
   model, not the 8B shape) in qlora-kit, LLaMA-Factory, axolotl and a plain trl script, 3 interleaved rounds of 100
   steps, bf16 compute; a peer that cannot be installed (no route to PyPI) or imported is named as left out with its
   reason, and the stage goes on without it;
6. the section: machine, versions, every figure, and the targets with pass or fail: at least 1.5x the plain script's
   tokens/s, at most 0.6x its peak VRAM, at least 40% MFU.

Without a GPU, `make bench-gpu` says so in one `error:` line and points to the dry run, which writes its section to
--results (benchmarks/out/RESULTS-dry-run.md from make) so the committed file only ever holds GPU figures. The dry
run's stage 5 runs peers.py on CPU with the two tools that need no install (qlora-kit and trl), one short round.

If peers.py itself fails (qlora-kit or trl could not train), the section says so in stage 5's place and the suite
exits 1 after writing it, so stages 1-4's figures are kept. A layout that fails is reported in its place the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import long_context  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import peers  # noqa: E402
import train_vs_trl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"tokens_per_second": 1.5, "peak_vram": 0.6, "mfu": 0.40}


@dataclass(frozen=True)
class Sizes:
    """What each stage runs: the 8B shape on a GPU, a tiny one for the dry run."""

    model: str
    max_length: int
    batch_size: int
    rows: int
    max_words: int
    warmup_steps: int
    steps: int
    lengths: tuple[int, ...]
    merge_steps: int
    peer_tools: tuple[str, ...]  # benchmarks/peers.py's tools, on the demo job
    peer_rounds: int
    peer_steps: int
    peer_skip_steps: int  # steps left out of peers.py's step time and tokens/s
    layout_rounds: int  # packed_step.py's interleaved rounds (after a warm-up round) and batches per round
    layout_batches: int


FULL = Sizes(
    model="arch:llama-3.1-8b",
    max_length=2048,
    batch_size=4,
    rows=400,
    max_words=600,
    warmup_steps=2,
    steps=6,
    lengths=(4096, 16384, 32768),
    merge_steps=30,  # past the point where most updates survive bf16 rounding (merge_precision.py --steps)
    peer_tools=("qlora-kit", "llamafactory", "axolotl", "trl"),
    peer_rounds=3,
    peer_steps=100,
    peer_skip_steps=5,
    layout_rounds=2,
    layout_batches=3,
)
DRY = Sizes(
    model="arch:llama-3.1-8b,num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
    "num_key_value_heads=2,vocab_size=4096",
    max_length=128,
    batch_size=2,
    rows=24,
    max_words=60,
    warmup_steps=1,
    steps=1,
    lengths=(64, 128),
    merge_steps=2,
    peer_tools=("qlora-kit", "trl"),  # the two that run in this environment: no peer install in a dry run
    peer_rounds=1,
    peer_steps=6,
    peer_skip_steps=2,
    layout_rounds=1,
    layout_batches=2,
)
# Switches that keep checkpointing on share one process (one model load), trl's selective checkpointing last (it wraps
# the model for good); turning checkpointing off needs a process of its own. The dry run checks the same code path
# with the first process only.
LADDER_GROUPS = [
    [
        "default",
        "every_n_layers=2",
        "offload=true",
        "activation_offloading=true",
        "use_liger_kernel=true",
        "selective=true",
    ],
    ["activation_checkpointing=false"],
]


# ---------------------------------------------------------------------------------------------------------------
# Stages


def write_data(sizes: Sizes, tokenizer: str, workdir: Path) -> Path:
    """The mixed-length chat data and recipe benchmarks/train_vs_trl.py writes, at these sizes."""
    args = argparse.Namespace(
        model=sizes.model,
        tokenizer=tokenizer,
        max_length=sizes.max_length,
        batch_size=sizes.batch_size,
        optim=None,
        rows=sizes.rows,
        min_words=8,
        max_words=sizes.max_words,
    )
    return train_vs_trl.write_recipe(args, workdir)


def training_stage(recipe_path: Path, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    from qlora_kit.bench import bench_train

    overrides = [f"data.cache_dir={workdir / 'data-cache'}"]
    report = bench_train(str(recipe_path), overrides, sizes.warmup_steps, sizes.steps, baseline=True, progress=print)
    report["baseline_plan"] = baseline_plan(str(recipe_path), [*overrides, f"model.name_or_path={report['model']}"])
    return report


def baseline_plan(recipe_path: str, overrides: list[str]) -> dict[str, Any]:
    """The planner for the plain script: peft's fp32 upcast of the unquantized weights kept (qlora-kit undoes it), and
    rows padded to the longest in the batch, at most max_length (so this is its upper bound)."""
    from qlora_kit.plan import Shape, predict, read_config, settings_from_recipe
    from qlora_kit.recipe import load_recipe
    from qlora_kit.resolve import this_machine

    recipe = load_recipe(recipe_path, overrides)
    config, source = read_config(recipe.model.name_or_path)
    shape = Shape.from_config(config, name=source)
    settings = settings_from_recipe(recipe, this_machine(), shape)
    return predict(shape, replace(settings, unquantized_bytes=4)).as_dict()


def layout_stage(recipe_path: Path, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """qlora-kit's step on the same packed batches in each layout the GPU can run (benchmarks/packed_step.py)."""
    import gc

    import packed_step
    import torch

    names = ["sdpa", "one-row"]
    left_out = {}
    if packed_step.flash_attention_available():
        names.append("flash-one-row")
    else:
        why = "the flash-attn package is not installed" if torch.cuda.is_available() else "no GPU"
        left_out["flash-one-row"] = why
    failed = None
    try:
        batches, measured = _time_layouts(recipe_path, sizes, workdir, names)
    except Exception as exc:  # a stage that fails is reported in the section, the others still run
        failed = f"{type(exc).__name__}: {exc}"[:300]
    gc.collect()  # the model and its optimizer went with _time_layouts' frame: give their GPU memory back
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if failed:
        return {"failed": failed, "left_out": left_out}
    tokens = sum(len(example["input_ids"]) for batch in batches for example in batch) / len(batches)
    layouts = {
        name: {
            "step_ms": 1000 * statistics.median(figures["seconds"]),
            "tokens_per_second": tokens / statistics.median(figures["seconds"]),
            "peak_bytes": figures["peak_bytes"],
        }
        for name, figures in measured.items()
    }
    return {"tokens_per_step": tokens, "layouts": layouts, "left_out": left_out}


def _time_layouts(recipe_path: Path, sizes: Sizes, workdir: Path, names: list[str]) -> tuple[list, dict]:
    """qlora-kit's trainer for the shape, and its step timed in each layout on the same batches."""
    import packed_step

    # Built for sdpa, so its own collator is the separate-rows one; each variant then sets kernel and collator.
    recipe = short_run_recipe(recipe_path, workdir, 1, ("model.attn_implementation=sdpa",))
    trainer, model = packed_step.build_from_recipe(recipe, workdir / "layouts")
    batches = packed_step.packed_batches(trainer, sizes.layout_batches)
    return batches, packed_step.interleaved(trainer, model, names, batches, sizes.layout_rounds)


def ladder_stage(sizes: Sizes, tokenizer: str, dry_run: bool) -> dict[str, Any]:
    groups = LADDER_GROUPS[:1] if dry_run else LADDER_GROUPS
    return long_context.ladder(sizes.model, tokenizer, list(sizes.lengths), groups, step_limit_s=120)


def short_run_recipe(recipe_path: Path, workdir: Path, steps: int, extra: tuple[str, ...] = ()):
    """The recipe of a few-step run of the shape, verified on a few held-out examples; its weights materialized."""
    from qlora_kit.bench.shapes import materialize_architecture
    from qlora_kit.recipe import load_recipe

    overrides = [
        f"data.cache_dir={workdir / 'data-cache'}",
        "data.eval_split=0.1",
        f"training.max_steps={steps}",
        "training.save_strategy=no",
        "training.report_to=none",
        "eval.num_samples=1",
        "eval.max_new_tokens=4",
        "eval.max_examples=8",
        "merge.verify_examples=4",
        "merge.verify_generations=2",
        *extra,
    ]
    recipe = load_recipe(str(recipe_path), overrides)
    materialize_architecture(recipe)
    return recipe


def merge_report(run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """`qlora-kit merge`'s report for the run, also when verification fails (the merge is then not published)."""
    from qlora_kit.merge import REPORT_NAME, VerificationFailed, merge_run

    try:
        merge_run(run_dir, overrides=overrides, force=True)
    except VerificationFailed as failed:
        return failed.report
    return json.loads((run_dir / "merged" / REPORT_NAME).read_text())


def merge_stage(recipe_path: Path, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """A short qlora-kit run of the shape, merged and verified; the merge report's verification figures."""
    from qlora_kit.train import train

    recipe = short_run_recipe(recipe_path, workdir, sizes.merge_steps)
    run_dir = workdir / "merge-run"
    started = time.perf_counter()
    train(recipe, run_dir, force=True)
    trained = time.perf_counter() - started
    report = merge_report(run_dir)
    verification = report["verification"] or {}
    keys = ("max_abs_logit_diff", "mean_abs_logit_diff", "loss_diff", "generation_agreement", "passed", "failures")
    return {
        "train_seconds": trained,
        "merge_seconds": time.perf_counter() - started - trained,
        "strategy": report["strategy"],
        "dtype": report["dtype"],
        "output_bytes": report["output_bytes"],
        **{key: verification.get(key) for key in keys},
    }


def peers_stage(sizes: Sizes, workdir: Path, dry_run: bool) -> dict[str, Any]:
    """benchmarks/peers.py on the demo job (GPU; CPU in the dry run): its report (peers.json), or why it failed.

    Peers left out for want of an install or an import are in the report's ``left_out``; only a failure of
    peers.py itself (qlora-kit's or trl's run, the held-out scoring) gives ``{"failed": last line}``."""
    out = workdir / "peers"
    command = [
        *(sys.executable, str(REPO / "benchmarks" / "peers.py"), "--device", "cpu" if dry_run else "cuda"),
        *("--tools", *sizes.peer_tools, "--rounds", str(sizes.peer_rounds), "--steps", str(sizes.peer_steps)),
        *("--skip-steps", str(sizes.peer_skip_steps), "--workdir", str(out)),
        *(("--threads", "1") if dry_run else ()),  # the dry run's machine is small and shared
    ]
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(result.stdout, flush=True)
    if result.returncode != 0:
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        return {"failed": f"peers.py exited {result.returncode}: {lines[-1] if lines else 'no output'}"}
    return json.loads((out / "peers.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Targets and the RESULTS.md section


def memory_of(side: dict[str, Any]) -> int:
    memory = side["memory"]
    return memory.get("cuda_peak_allocated_bytes", memory.get("peak_rss_bytes"))


def targets(training: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and pass/fail (None where it cannot be judged: MFU without a GPU)."""
    toolkit, baseline = training["sides"]["toolkit"], training["sides"]["baseline"]
    speed = toolkit["tokens_per_second"] / baseline["tokens_per_second"]
    memory = memory_of(toolkit) / memory_of(baseline)
    mfu = toolkit.get("mfu")
    return [
        {"target": f"tokens/s >= {TARGETS['tokens_per_second']}x plain trl", "value": f"{speed:.2f}x",
         "passed": speed >= TARGETS["tokens_per_second"]},
        {"target": f"peak VRAM <= {TARGETS['peak_vram']}x plain trl", "value": f"{memory:.2f}x",
         "passed": memory <= TARGETS["peak_vram"]},
        {"target": f"MFU >= {TARGETS['mfu']:.0%}", "value": "n/a (no GPU)" if mfu is None else f"{mfu:.1%}",
         "passed": None if mfu is None else mfu >= TARGETS["mfu"]},
    ]  # fmt: skip


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f} MiB"


def training_table(training: dict[str, Any]) -> list[str]:
    sides = training["sides"]
    toolkit, baseline = sides["toolkit"], sides["baseline"]
    plans = (training["plan"]["total_bytes"], training["baseline_plan"]["total_bytes"])
    rows = [
        ("tokens/s (real example tokens)", *(f"{s['tokens_per_second']:,.1f}" for s in (toolkit, baseline))),
        ("MFU (6N)", *("n/a" if s.get("mfu") is None else f"{s['mfu']:.1%}" for s in (toolkit, baseline))),
        ("peak memory (measured)", *(_mib(memory_of(s)) for s in (toolkit, baseline))),
        ("peak memory (planner)", *(_mib(p) for p in plans)),
        ("step time, mean (s)", *(f"{s['step_time_mean_s']:.2f}" for s in (toolkit, baseline))),
        ("padding efficiency", *(f"{s['padding_efficiency']:.1%}" for s in (toolkit, baseline))),
    ]
    lines = ["| figure | qlora-kit | plain trl |", "|---|---|---|"]
    return lines + [f"| {a} | {b} | {c} |" for a, b, c in rows]


def section(result: dict[str, Any], command: str) -> str:
    """The dated RESULTS.md section for one suite run."""
    training, machine = result["training"], result["training"]["machine"]
    where = (
        f"{machine['gpu']} ({machine['gpu_memory_bytes'] / 2**30:.0f} GiB)"
        if "gpu" in machine
        else (f"{machine['cpus']}-core CPU ({machine['cpu']}), no GPU")
    )
    kind = "GPU suite, dry run (tiny shape: checks the suite, not the targets)" if result["dry_run"] else "GPU suite"
    versions = ", ".join(f"{k} {v}" for k, v in training["versions"].items())
    lines = [
        f"## {kind}: {result['date']}",
        "",
        "```bash",
        command,
        "```",
        "",
        f"**Machine**: {where}, {machine['platform']}. **Versions**: {versions}. **Model**: "
        f"`{result['model']}`, random weights, QLoRA r=16 on all linear layers, "
        f"{result['sizes']['max_length']}-token rows, batch {result['sizes']['batch_size']}. "
        f"**Wall time**: {result['seconds']:.0f} s ({'within' if result['seconds'] <= 480 else 'over'} the 8-minute "
        "budget).",
        "",
        *training_table(training),
        "",
        "| target | measured | result |",
        "|---|---|---|",
        *(
            f"| {t['target']} | {t['value']} | {'n/a' if t['passed'] is None else 'pass' if t['passed'] else 'FAIL'} |"
            for t in result["targets"]
        ),
        "",
        "Long-context ladder (`benchmarks/long_context.py`; one step per length, memory the step adds):",
        "",
        long_context.markdown(result["ladder"]).rstrip(),
        "",
        _layout_line(result["layouts"], result["sizes"]),
        "",
        _merge_line(result["merge"]),
        "",
        *peers_lines(result["peers"], result["sizes"]),
    ]
    return "\n".join(lines)


def peers_lines(report: dict[str, Any], sizes: dict[str, Any]) -> list[str]:
    """Stage 4's part of the section: peers.py's table, the tools left out and why, the peers' versions."""
    if "failed" in report:
        return [f"qlora-kit beside the peers (`benchmarks/peers.py`): FAILED ({report['failed']}).", ""]
    job = report["job"]
    compute = "bf16" if job["bf16"] else "float32"  # the 4-bit compute dtype every tool is given
    optimizer = f"{job['optim']} for every tool" if job["optim"] else "each tool's optimizer as configured for CPU"
    lines = [
        f"qlora-kit beside the peers (`benchmarks/peers.py`, the demo job of `recipes/demo.yaml` on "
        f"{report['device']}: {compute} 4-bit compute dtype, {optimizer}, packing "
        f"{'on' if job['packing'] else 'off'}, {sizes['peer_steps']} steps, throughput after step "
        f"{report['skip_steps']}; medians of {sizes['peer_rounds']} interleaved round(s)):",
        "",
        peers.table(report["results"]),
        "",
    ]
    left_out = "; ".join(f"{tool}: {why}" for tool, why in report["left_out"].items())
    versions = "; ".join(f"{tool}: " + ", ".join(f"{k} {v}" for k, v in pins.items())
                         for tool, pins in report["peer_versions"].items())  # fmt: skip
    if left_out:
        lines += [f"Left out: {left_out}.", ""]
    if versions:
        lines += [f"Peer versions: {versions}.", ""]
    return lines


LAYOUT_NAMES = {
    "sdpa": "sdpa, one packed row per batch slot",
    "one-row": "sdpa, the batch in one row",
    "flash-one-row": "flash-attention varlen, the batch in one row",
}


def _layout_line(report: dict[str, Any], sizes: dict[str, Any]) -> str:
    left_out = "; ".join(f"{LAYOUT_NAMES[name]}: left out ({why})" for name, why in report["left_out"].items())
    if "failed" in report:
        return f"Packed layouts (`benchmarks/packed_step.py`): FAILED ({report['failed']})." + (
            f" {left_out}." if left_out else ""
        )
    layouts = report["layouts"]
    first = layouts["sdpa"]["step_ms"]
    parts = [
        f"{LAYOUT_NAMES[name]} {figures['step_ms']:.0f} ms ({figures['tokens_per_second']:,.0f} tokens/s, "
        f"{first / figures['step_ms']:.2f}x"
        + (f", peak {figures['peak_bytes'] / 2**20:,.0f} MiB" if figures["peak_bytes"] else "")
        + ")"
        for name, figures in layouts.items()
    ]
    return (
        f"Packed layouts (`benchmarks/packed_step.py` on stage 1's data, {report['tokens_per_step']:,.0f} tokens a "
        f"step, median of {sizes['layout_rounds']} interleaved round(s) x {sizes['layout_batches']} batches): "
        + "; ".join(parts)
        + (f"; {left_out}" if left_out else "")
        + "."
    )


def _merge_line(merge: dict[str, Any]) -> str:
    verdict = "passed" if merge["passed"] else f"FAILED ({'; '.join(merge['failures'] or [])})"
    agreement = merge["generation_agreement"]
    return (
        f"Merge ({merge['strategy']}, {merge['dtype']}, {merge['output_bytes'] / 2**30:.2f} GiB written, "
        f"{merge['merge_seconds']:.0f} s after a {merge['train_seconds']:.0f} s run): verification {verdict}; "
        f"max |logit difference| {merge['max_abs_logit_diff']:.3g}, mean {merge['mean_abs_logit_diff']:.3g}, "
        f"loss difference {merge['loss_diff']:.3g}, greedy generations agreeing "
        f"{'–' if agreement is None else f'{agreement:.0%}'}."
    )


def append_section(results: Path, text: str) -> None:
    """Append the section to ``results`` atomically (written beside it, then renamed over it)."""
    previous = results.read_text() if results.is_file() else "# Benchmark results\n"
    staged = results.with_name(f".{results.name}.partial")
    staged.write_text(previous.rstrip("\n") + "\n\n" + text)
    staged.replace(results)


# ---------------------------------------------------------------------------------------------------------------
# The command


def run_suite(
    dry_run: bool,
    tokenizer: str,
    results: Path,
    command: str,
    peer_tools: list[str] | None = None,
    peer_rounds: int | None = None,
) -> dict[str, Any]:
    sizes = DRY if dry_run else FULL
    if peer_tools:
        sizes = replace(sizes, peer_tools=tuple(peer_tools))
    if peer_rounds:
        sizes = replace(sizes, peer_rounds=peer_rounds)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as scratch:
        workdir = Path(scratch)
        recipe_path = write_data(sizes, tokenizer, workdir)
        print("stage 1/5: qlora-kit beside plain trl", flush=True)
        training = training_stage(recipe_path, sizes, workdir)
        print("stage 2/5: the long-context ladder", flush=True)
        ladder = ladder_stage(sizes, tokenizer, dry_run)
        print("stage 3/5: packed layouts (benchmarks/packed_step.py)", flush=True)
        layouts = layout_stage(recipe_path, sizes, workdir)
        print("stage 4/5: a short run, merged and verified", flush=True)
        merge = merge_stage(recipe_path, sizes, workdir)
        print("stage 5/5: qlora-kit beside the peers (benchmarks/peers.py)", flush=True)
        peers_report = peers_stage(sizes, workdir, dry_run)
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "dry_run": dry_run,
        "model": sizes.model,
        "sizes": sizes.__dict__,
        "training": training,
        "targets": targets(training),
        "layouts": layouts,
        "ladder": ladder,
        "merge": merge,
        "peers": peers_report,
        "seconds": time.perf_counter() - started,
    }
    text = section(result, command)
    append_section(results, text)
    print(text)
    print(f"written: {results}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every stage on CPU with a tiny shape")
    parser.add_argument(
        "--results",
        help="the Markdown file the section is appended to (default benchmarks/RESULTS.md; with --dry-run "
        "benchmarks/out/RESULTS-dry-run.md, so dry runs never reach the committed file)",
    )
    parser.add_argument("--tokenizer", default=str(REPO / "models" / "demo-base"))
    parser.add_argument("--json", help="also write every figure here")
    parser.add_argument("--peer-rounds", type=int, help="stage 5's interleaved rounds (default 3; 1 in the dry run)")
    parser.add_argument(
        "--peer-tools",
        nargs="+",
        help="the tools stage 5 runs (default: qlora-kit, LLaMA-Factory, axolotl, trl; qlora-kit and trl need no "
        "install, for a GPU machine that cannot reach PyPI)",
    )
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "error: make bench-gpu needs one NVIDIA GPU and this machine has none: run `make bench-gpu-dry` "
            "(python benchmarks/gpu_suite.py --dry-run) to run every stage on CPU with a tiny shape",
            file=sys.stderr,
        )
        return 2
    default = REPO / "benchmarks" / ("out/RESULTS-dry-run.md" if args.dry_run else "RESULTS.md")
    results = Path(args.results) if args.results else default
    results.parent.mkdir(parents=True, exist_ok=True)
    command = "make bench-gpu-dry" if args.dry_run else "make bench-gpu"
    result = run_suite(args.dry_run, args.tokenizer, results, command, args.peer_tools, args.peer_rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 1 if "failed" in result["peers"] else 0


if __name__ == "__main__":
    sys.exit(main())
