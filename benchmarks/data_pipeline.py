"""Data-pipeline throughput: qlora-kit's pipeline (cold, then cached) beside trl's own SFTTrainer preprocessing.

Generates a deterministic dataset of multi-turn conversations, then measures in the same process:

- qlora-kit cold: read + check + render + tokenize + mask + length policy + write the cache;
- qlora-kit cached: the same call again (the cache key is recomputed: the data file is hashed, nothing re-tokenized);
- trl cold: ``load_dataset("json")`` + ``SFTTrainer(...)`` dataset preparation with ``assistant_only_loss=True``
  (ChatML with ``{% generation %}`` markers, so both produce assistant-only labels), in a fresh datasets cache;
- trl cached: the same again, where datasets' own map cache applies.

Rows/s count input conversations; tokens/s count the tokens of the prepared training examples. A sample of rows
is compared token by token between the two pipelines.

``--mix tools-reasoning`` measures modern chat data instead: a third each of tool calls (a ``tools`` column, an
assistant ``tool_calls`` turn, a ``tool`` result, the answer), single-turn reasoning (``reasoning_content``) and
two-turn reasoning, rendered with Qwen3's template (qlora-kit's shipped ``qwen3``; for trl the published Qwen3
template, which trl swaps for its ``{% generation %}`` training variant). Agreement is reported per form.

    python benchmarks/data_pipeline.py --rows 100000 --tokenizer models/demo-base
    python benchmarks/data_pipeline.py --rows 20000 --mix tools-reasoning
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a of to and in is it that for on with as was by at be this from or an are not have one all can "
    "number plus minus answer question model data train token word cat dog river mountain city light"
).split()

# ChatML with generation markers: what trl's assistant_only_loss needs; renders the same text as qlora-kit's chatml.
CHATML_GENERATION = (
    "{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>\\n' }}{%- endgeneration -%}{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Conversations of 1-3 exchanges, a system prompt in a third of them, answers of 3-60 words."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            messages = [{"role": "system", "content": sentence(rng, 3, 10)}] if rng.random() < 0.33 else []
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": sentence(rng, 3, 25) + "?"})
                messages.append({"role": "assistant", "content": sentence(rng, 3, 60) + "."})
            handle.write(json.dumps({"messages": messages}) + "\n")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
FORMS = ("tools", "reasoning", "multi-turn-reasoning")


def modern_row(rng: random.Random, form: str) -> dict:
    """One conversation of the tools-reasoning mix (the same columns in every row, as a hub dataset has)."""
    question = {"role": "user", "content": sentence(rng, 3, 25) + "?"}
    if form == "tools":
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": rng.choice(WORDS)}}}
        messages = [
            question,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": json.dumps({"temp_c": rng.randint(-20, 40)})},
            {"role": "assistant", "content": sentence(rng, 3, 40) + "."},
        ]
        return {"form": form, "tools": [WEATHER], "messages": messages}
    turns = 1 if form == "reasoning" else 2
    messages = []
    for _ in range(turns):
        messages.append({"role": "user", "content": sentence(rng, 3, 25) + "?"})
        messages.append(
            {"role": "assistant", "content": sentence(rng, 3, 30) + ".", "reasoning_content": sentence(rng, 10, 60)}
        )
    return {"form": form, "tools": None, "messages": messages}


def generate_modern(path: Path, rows: int, seed: int = 0) -> list[str]:
    """The tools-reasoning mix; returns each row's form."""
    rng = random.Random(seed)
    forms = [FORMS[i % len(FORMS)] for i in range(rows)]
    with path.open("w") as handle:
        for index, form in enumerate(forms):  # trl keeps extra columns: the index pairs its rows with qlora-kit's
            handle.write(json.dumps({"index": index, **modern_row(rng, form)}) + "\n")
    return forms


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def run_qlora_kit(
    data_file: Path, tokenizer_dir: str, cache_dir: Path, max_length: int, num_proc: int | None, template: str
):
    from qlora_kit.data import build_datasets
    from qlora_kit.recipe import validate
    from qlora_kit.tokenizer import load_tokenizer

    recipe = validate(
        {
            "model": {"name_or_path": tokenizer_dir, "chat_template": template},
            "data": {
                "train": [{"path": str(data_file), "format": "messages"}],
                "max_length": max_length,
                "cache_dir": str(cache_dir),
                "num_proc": num_proc,
            },
        }
    )
    tokenizer = load_tokenizer(recipe)
    cold, cold_s = timed(lambda: build_datasets(recipe, tokenizer, show_progress=False))
    warm, warm_s = timed(lambda: build_datasets(recipe, tokenizer, show_progress=False))
    assert (cold.stats.cache, warm.stats.cache) == ("miss", "hit")
    return cold, cold_s, warm, warm_s


def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def trl_template(mix: str) -> str:
    """ChatML with generation markers, or the published Qwen3 template as trl ships it (trl recognises it and
    trains with its own marked variant)."""
    if mix == "chat":
        return CHATML_GENERATION
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()


def run_trl(
    data_file: Path, tokenizer_dir: str, datasets_cache: Path, out: Path, max_length: int, num_proc: int, mix: str
):
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = trl_template(mix)
    model = tiny_model(tokenizer)
    args = SFTConfig(
        output_dir=str(out),
        max_length=max_length,
        assistant_only_loss=True,
        report_to="none",
        dataset_num_proc=num_proc if num_proc > 1 else None,
        use_cpu=True,
    )

    def prepare():
        dataset = datasets.load_dataset(
            "json", data_files=str(data_file), split="train", cache_dir=str(datasets_cache)
        )
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train_dataset

    cold, cold_s = timed(prepare)
    warm, warm_s = timed(prepare)
    return cold, cold_s, warm, warm_s


def trl_labels(theirs) -> list[list[int]]:
    """trl's labels: its input_ids where its assistant mask is 1 (the collator builds them the same way)."""
    if "labels" in theirs.column_names:
        return theirs["labels"]
    return [
        [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        for ids, mask in zip(theirs["input_ids"], theirs["assistant_masks"], strict=True)
    ]


def compare(ours, theirs, sample: int = 2000) -> float:
    """Share of sampled rows where both pipelines give identical input_ids and labels."""
    count = min(sample, len(ours), len(theirs))
    a, b = ours.select(range(count)), theirs.select(range(count))
    same = sum(
        x == y and p == q
        for x, y, p, q in zip(a["input_ids"], b["input_ids"], a["labels"], trl_labels(b), strict=True)
    )
    return same / count if count else 0.0


def agreement_by_form(ours, theirs, forms: list[str]) -> dict[str, str]:
    """Per form: rows with identical input_ids and labels in both pipelines, paired by the rows' index column (trl
    drops rows its mask leaves without a trained token; such a row counts as different)."""
    position = {index: j for j, index in enumerate(theirs["index"])}
    their_ids, their_labels = theirs["input_ids"], trl_labels(theirs)
    same, total = dict.fromkeys(FORMS, 0), dict.fromkeys(FORMS, 0)
    for i, (ids, labels) in enumerate(zip(ours["input_ids"], ours["labels"], strict=True)):
        total[forms[i]] += 1
        j = position.get(i)
        same[forms[i]] += j is not None and ids == their_ids[j] and labels == their_labels[j]
    return {form: f"{same[form] / total[form]:.1%} of {total[form]:,}" for form in FORMS if total[form]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokenizer", default=os.environ.get("QLORA_KIT_BENCH_TOKENIZER", "models/demo-base"))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-proc", type=int, default=None, help="processes for both pipelines (default: auto)")
    parser.add_argument("--mix", choices=("chat", "tools-reasoning"), default="chat", help="what the rows hold")
    args = parser.parse_args()

    from qlora_kit.data.build import processes_for

    num_proc = args.num_proc or processes_for(args.rows, None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data_file = tmp_path / "conversations.jsonl"
        forms = generate(data_file, args.rows) if args.mix == "chat" else generate_modern(data_file, args.rows)
        template = "chatml" if args.mix == "chat" else "qwen3"
        cache = tmp_path / "qlora-kit-cache"
        ours = run_qlora_kit(data_file, args.tokenizer, cache, args.max_length, num_proc, template)
        theirs = run_trl(
            data_file,
            args.tokenizer,
            tmp_path / "datasets-cache",
            tmp_path / "trl-out",
            args.max_length,
            num_proc,
            args.mix,
        )
        report(args, num_proc, data_file, ours, theirs, forms)
    return 0


def report(args, num_proc: int, data_file: Path, ours, theirs, forms: list[str] | None) -> None:
    from importlib.metadata import version

    our_tokens = ours[0].stats.tokens
    their_tokens = sum(len(ids) for ids in theirs[0]["input_ids"])
    lines = [
        f"{args.rows:,} conversations ({data_file.stat().st_size / 2**20:.1f} MiB JSONL), max_length "
        f"{args.max_length}, {num_proc} process(es), tokenizer {args.tokenizer}",
        "versions: " + ", ".join(f"{n} {version(n)}" for n in ("transformers", "tokenizers", "trl", "datasets")),
        "| run | seconds | rows/s | tokens/s |",
        "|---|---:|---:|---:|",
    ]
    runs = {
        "qlora-kit cold": (ours[1], our_tokens),
        "qlora-kit cached": (ours[3], our_tokens),
        "trl SFTTrainer cold": (theirs[1], their_tokens),
        "trl SFTTrainer cached": (theirs[3], their_tokens),
    }
    for name, (seconds, tokens) in runs.items():
        lines.append(f"| {name} | {seconds:.2f} | {args.rows / seconds:,.0f} | {tokens / seconds:,.0f} |")
    lines += [
        f"ratios: qlora-kit cold / trl cold = {theirs[1] / ours[1]:.2f}x speed; qlora-kit cached / trl cached = "
        f"{theirs[3] / ours[3]:.2f}x; qlora-kit cached / qlora-kit cold = {ours[1] / ours[3]:.1f}x",
        f"same tokens and labels as trl on a {min(2000, len(ours[0].train))}-row sample: "
        f"{compare(ours[0].train, theirs[0]):.1%}; examples {len(ours[0].train):,} vs {len(theirs[0]):,}; "
        f"tokens {our_tokens:,} vs {their_tokens:,}",
    ]
    if forms and len(ours[0].train) == len(forms):  # qlora-kit kept every row, so its rows are in the file's order
        agreement = agreement_by_form(ours[0].train, theirs[0], forms)
        lines.append("same tokens and labels per form: " + ", ".join(f"{k} {v}" for k, v in agreement.items()))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
