"""GGUF export: time and peak memory per type, and generation speed of each GGUF in llama.cpp vs transformers.

Builds a random-weight Llama (the demo tokenizer; hidden 512, intermediate 1536, 8 layers by default, so every
matrix divides into k-quant blocks of 256) with a LoRA adapter, merges it, then:

- exports each type in a fresh process (`export_run` with verification off, so the time is llama.cpp's converter
  plus its quantizer) and records wall time and peak resident memory above the process's footprint after imports;
- generates the same number of tokens greedily from the same prompts with each GGUF in llama.cpp
  (llama-cpp-python, token ids in, no stop token) and with the merged model in transformers (float32, batch 1).

    python benchmarks/export.py                 # prints the tables and appends them to benchmarks/RESULTS.md
    python benchmarks/export.py --layers 2 --no-record
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
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
TYPES = ["f16", "bf16", "q8_0", "q5_k_m", "q4_k_m"]
PROMPTS = ["What is the sum of 4 and 18?", "Name the capital city of Zelmont.", "What number comes after 53?"]

MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    import torch, transformers, llama_cpp  # every import the export needs, before the baseline
    from qlora_kit.export import export_run
    run, output, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    baseline = hwm()
    started = time.perf_counter()
    report = export_run(run, output, [f"types=[{kind}]", "verify=false"]).report
    seconds = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the converter's process (kB on Linux)
    result = {"seconds": seconds, "baseline": baseline, "peak": hwm(), "converter_peak": children}
    print(json.dumps({**result, **report["files"][kind]}))
""")


def build(folder: Path, args: argparse.Namespace) -> Path:
    """A random-weight base, a LoRA adapter with non-zero updates, held-out chats, and a run directory around it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_kit.merge import merge_run
    from qlora_kit.model import lora_config
    from qlora_kit.recipe import resolved_dict, to_yaml, validate

    tokenizer = AutoTokenizer.from_pretrained(REPO / "models" / "demo-base")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "42"}]} for p in PROMPTS]
    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = {"model": {"name_or_path": str(folder / "base")}, "lora": {"r": 16}}
    raw |= {"data": {"train": [{"path": str(data)}], "eval": {"path": str(data)}, "max_length": 128}}
    recipe = validate({**raw, "quantization": {"bnb_4bit_compute_dtype": "float32"}})
    peft_model = get_peft_model(model, lora_config(recipe))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    run = folder / "run"
    peft_model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    (run / "recipe.yaml").write_text(to_yaml(resolved_dict(recipe)))
    merge_run(run, overrides=["verify=false"])
    return run


def measure_export(run: Path, kind: str, output: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(run), str(output), kind], capture_output=True, text=True, env=env, cwd=REPO
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} export failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prompt_ids(tokenizer) -> list[list[int]]:
    from qlora_kit.evaluate.generation import encode_prompts

    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    return encode_prompts(tokenizer, texts)


def best_of(repeats: int, run) -> float:
    """Tokens/s of the fastest of ``repeats`` timed passes (on a shared machine the slower ones measure the others)."""
    return max(run() for _ in range(repeats))


def transformers_speed(merged: Path, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()

    @torch.no_grad()
    def timed() -> float:
        started = time.perf_counter()
        for ids in prompts:
            out = model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            assert out.shape[1] - len(ids) == new_tokens
        return len(prompts) * new_tokens / (time.perf_counter() - started)

    with torch.no_grad():
        model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm-up
    return best_of(repeats, timed)


def llama_speed(path: Path, prompts: list[list[int]], new_tokens: int, threads: int, repeats: int) -> float:
    from qlora_kit.export import llamacpp
    from qlora_kit.export.verify import llama_greedy

    model = llamacpp.load(path, context=256, threads=threads)

    def timed() -> float:
        started = time.perf_counter()
        for ids in prompts:
            assert len(llama_greedy(model, ids, new_tokens, [])) == new_tokens
        return len(prompts) * new_tokens / (time.perf_counter() - started)

    llama_greedy(model, prompts[0], 4, [])  # warm-up
    speed = best_of(repeats, timed)
    model.close()
    return speed


def markdown(args, exports: dict, speeds: dict, weights: int) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"## GGUF export: time, memory and llama.cpp generation speed per type ({date.today()})",
        "",
        f"`python benchmarks/export.py` on a {os.cpu_count()}-core {cpu} CPU, no GPU, other jobs running; Python "
        f"{platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}, "
        f"llama-cpp-python {version('llama-cpp-python')}, gguf {version('gguf')}. Random-weight Llama, hidden "
        f"{args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocabulary 768 ({weights / 1e6:.1f}M "
        f"weights, float32 merged model); {len(PROMPTS)} prompts x {args.new_tokens} greedy tokens, batch 1, "
        f"{args.threads} threads in llama.cpp. One run: every export in a fresh process; generation speed is the "
        f"fastest of {args.repeats} timed passes after a warm-up.",
        "",
        "| type | file (MB) | export time (s) | of which quantize (s) | peak RSS above imports (MiB) | "
        "converter process peak RSS (MiB) | llama.cpp tokens/s | vs transformers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = speeds["transformers"]
    for kind, row in exports.items():
        lines.append(
            f"| {kind} | {row['bytes'] / 1e6:.1f} | {row['seconds']:.1f} | {row['quantize_s']:.2f} | "
            f"{(row['peak'] - row['baseline']) / 2**20:,.0f} | {row['converter_peak'] / 2**20:,.0f} | "
            f"{speeds[kind]:.1f} | {speeds[kind] / base:.2f}x |"
        )
    lines.append(f"| merged model in transformers (float32) | | | | | | {base:.1f} | 1.00x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="timed generation passes, fastest kept (default 3)")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to RESULTS.md")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        run = build(Path(scratch), args)
        exports = {kind: measure_export(run, kind, Path(scratch) / f"gguf-{kind}") for kind in TYPES}
        tokenizer = AutoTokenizer.from_pretrained(run / "merged")
        prompts = prompt_ids(tokenizer)
        speeds = {"transformers": transformers_speed(run / "merged", prompts, args.new_tokens, args.repeats)}
        for kind, row in exports.items():
            path = Path(scratch) / f"gguf-{kind}" / row["file"]
            speeds[kind] = llama_speed(path, prompts, args.new_tokens, args.threads, args.repeats)
        from qlora_kit.merge.checkpoint import Checkpoint

        weights = sum(s.nbytes for s in Checkpoint(run / "merged").specs.values()) // 4
    text = markdown(args, exports, speeds, weights)
    print(text)
    if args.record:
        with RESULTS.open("a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
