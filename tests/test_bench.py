"""bench train / bench generate on tiny models on CPU: real trainer steps, real generation, well-formed reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qlora_kit import bench, plan
from qlora_kit.cli import main
from qlora_kit.errors import UserError
from qlora_kit.recipe import load_recipe
from qlora_kit.train import train

from .conftest import DEMO_MODEL, REPO, sum_pairs, tiny_recipe, unpaired

SIDE_KEYS = {
    "tokens_per_second",
    "loss_tokens_per_second",
    "padded_tokens_per_second",
    "step_time_mean_s",
    "time_to_first_step_s",
    "padding_efficiency",
    "packing_fill",
    "memory",
    "mfu",
    "tokens",
    "quantized_weight_bytes",
    "measured_steps",
}


def test_meter_counts_padded_padding_free_and_packed_row_batches():
    meter = bench.Meter(started=0.0)
    pad = 3
    padded = {
        "input_ids": torch.full((2, 5), 9),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
        "labels": torch.tensor([[-100, 7, 7, 7, -100], [-100, 7, -100, -100, -100]]),
    }
    meter.count(padded, pad)
    assert meter.pending == {"processed": 7, "loss": 4, "padded": 10, "sequences": 2}
    # Padding-free: one flattened row, no attention mask, each sequence's first label already -100.
    flat = {
        "input_ids": torch.full((1, 6), 9),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]]),
        "labels": torch.tensor([[-100, 7, 7, -100, -100, 7]]),
    }
    meter.count(flat, pad)
    assert meter.pending == {"processed": 13, "loss": 7, "padded": 16, "sequences": 3}
    # Packed rows kept apart: the second row ends in two pad tokens, which are not real tokens.
    rows = {
        "input_ids": torch.tensor([[9, 9, 9, 9], [9, 9, pad, pad]]),
        "position_ids": torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]]),
        "labels": torch.tensor([[-100, 7, -100, 7], [-100, 7, -100, -100]]),
    }
    meter.count(rows, pad)
    assert meter.pending == {"processed": 19, "loss": 10, "padded": 24, "sequences": 5}


def test_preference_batches_are_counted_per_collator_layout():
    # trl's DPO collator: chosen rows then rejected rows, right-padded; the completion mask marks the answers.
    dpo = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]),
        "completion_mask": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]),
    }
    assert bench.batch_tokens(dpo, 0) == {"processed": 16, "loss": 6, "padded": 20, "sequences": 4}
    # KTO: its mismatched KL completions are read by the policy too, but take no gradient.
    kto = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "completion_mask": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]),
        "KL_input_ids": torch.tensor([[1, 2, 3, 9], [7, 8, 4, 5]]),
        "KL_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]]),
        "KL_completion_mask": torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]]),
        "label": torch.tensor([True, False]),
    }
    assert bench.batch_tokens(kto, 0) == {"processed": 16, "loss": 3, "padded": 18, "sequences": 4}
    # ORPO / CPO: chosen and rejected side by side, concatenated to the longer of the two widths.
    orpo = {
        "prompt_input_ids": torch.tensor([[1, 2, 3], [0, 7, 8]]),
        "chosen_input_ids": torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]),
        "chosen_attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "chosen_labels": torch.tensor([[-100, -100, -100, 4, 5], [-100, -100, 9, -100, -100]]),
        "rejected_input_ids": torch.tensor([[1, 2, 3, 6], [7, 8, 10, 11]]),
        "rejected_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]]),
        "rejected_labels": torch.tensor([[-100, -100, -100, 6], [-100, -100, 10, 11]]),
    }
    assert bench.batch_tokens(orpo, 0) == {"processed": 16, "loss": 6, "padded": 20, "sequences": 4}


def test_summary_skips_warmup_steps():
    meter = bench.Meter(started=0.0)
    meter.steps = [
        {"seconds": 9.0, "since_start": 12.0, "processed": 10, "loss": 5, "padded": 20, "sequences": 2},
        {"seconds": 1.0, "since_start": 13.0, "processed": 100, "loss": 50, "padded": 100, "sequences": 2},
        {"seconds": 3.0, "since_start": 16.0, "processed": 300, "loss": 10, "padded": 400, "sequences": 2},
    ]
    summary = bench.summarize(meter, warmup=1)
    assert summary["tokens_per_second"] == 100.0 and summary["loss_tokens_per_second"] == 15.0
    assert summary["padding_efficiency"] == 0.8 and summary["time_to_first_step_s"] == 12.0
    assert summary["step_time_mean_s"] == 2.0 and summary["steps_per_second"] == 0.5
    with pytest.raises(UserError, match="--warmup-steps"):
        bench.summarize(meter, warmup=3)


def test_liger_is_checked_for_the_machine_that_trains(tmp_path, tiny_model_dir, arithmetic_rows):
    from qlora_kit.launch import preflight
    from qlora_kit.resolve import Launch, Machine

    # A GPU recipe validates anywhere; pre-flight refuses it where it cannot run (here: no GPU), in one line.
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows), ["training.use_liger_kernel=true"])
    assert recipe.training["use_liger_kernel"] is True
    with pytest.raises(UserError, match=r"training.use_liger_kernel: Liger's kernels are Triton kernels for CUDA"):
        preflight(recipe, Launch(), Machine())


def test_random_weight_architecture_trains_on_cpu(tmp_path, monkeypatch, arithmetic_rows):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    spec = (
        "arch:llama-3.1-8b,num_hidden_layers=1,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
        "num_key_value_heads=2,vocab_size=256"
    )
    path = tiny_recipe(tmp_path, DEMO_MODEL, arithmetic_rows)
    overrides = [f"model.name_or_path={spec}", f"model.tokenizer_name_or_path={DEMO_MODEL}"]
    recipe = load_recipe(path, overrides)
    built = bench.materialize_architecture(recipe)
    config = json.loads((built / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 64 and "llama3" in json.dumps(config)
    assert config["vocab_size"] >= 256  # grown to the tokenizer when it is larger
    assert bench.materialize_architecture(load_recipe(path, overrides)) == built  # cached

    out = tmp_path / "toolkit.json"
    bench.run_side("toolkit", str(path), [*overrides, f"model.name_or_path={built}"], 1, 2, out)
    result = json.loads(out.read_text())
    assert SIDE_KEYS <= set(result) and result["measured_steps"] == 2
    assert result["tokens"]["processed"] > result["tokens"]["loss"] > 0
    # Packed rows: the only padding is at the end of rows shorter than the batch's longest.
    assert 0.9 < result["padding_efficiency"] <= 1 and 0 < result["packing_fill"] <= 1
    expected = plan.quantized_weight_bytes(plan.Shape.from_config(config), 4, True, 4)
    assert result["quantized_weight_bytes"] == expected
    with pytest.raises(UserError, match="tokenizer_name_or_path"):
        bench.materialize_architecture(load_recipe(path, [f"model.name_or_path={spec}"]))


def test_bench_train_cli_reports_both_sides(tmp_path, tiny_model_dir, arithmetic_rows):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows)
    out = tmp_path / "bench"
    command = [
        sys.executable,
        "-m",
        "qlora_kit",
        "bench",
        "train",
        str(recipe),
        "--warmup-steps",
        "1",
        "--steps",
        "2",
        "--output-dir",
        str(out),
        "training.per_device_train_batch_size=4",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert set(report["sides"]) == {"toolkit", "baseline"}
    for side in report["sides"].values():
        assert SIDE_KEYS <= set(side) and side["measured_steps"] == 2 and side["memory"]["peak_rss_bytes"] > 0
        assert side["tokens_per_second"] > 0 and side["mfu"] is None  # no MFU without a GPU
    toolkit, baseline = report["sides"]["toolkit"], report["sides"]["baseline"]
    assert toolkit["packing_fill"] is not None and baseline["packing_fill"] is None
    assert baseline["padding_efficiency"] < 1.0  # the baseline pads mixed lengths
    assert report["ratios"]["tokens_per_second"] == pytest.approx(
        toolkit["tokens_per_second"] / baseline["tokens_per_second"]
    )
    assert report["plan"]["total_bytes"] > 0 and report["versions"]["trl"]
    markdown = (out / "bench.md").read_text()
    assert "| metric | toolkit | baseline | ratio |" in markdown and "tokens/s (processed)" in markdown
    assert "tokens/s (processed)" in result.stdout
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already exists" in again.stderr


PAIRS = 4  # one batch holds every training row, so each step reads all of them whatever the order


def preference_bench_recipe(tmp_path, model_dir, method: str, paired: bool = False) -> tuple[str, object]:
    """PAIRS training examples: pairs, or for KTO unpaired rows (from PAIRS / 2 pairs, unpaired here or, with
    ``paired``, by each side itself)."""
    from .test_preference import preference_recipe, write_recipe

    pairs = sum_pairs(PAIRS if method != "kto" else PAIRS // 2)
    pairs[0]["prompt"][0]["content"] += " Answer with the number alone."  # sequences of several lengths: padding
    pairs[1]["chosen"][0]["content"] += " is the sum."
    rows = unpaired(pairs) if method == "kto" and not paired else pairs
    raw = preference_recipe(tmp_path, model_dir, method, rows, rows[:2], per_device_train_batch_size=PAIRS)
    path = write_recipe(tmp_path, raw)
    return path, load_recipe(path)


def fed_counts(dataset) -> dict[str, int]:
    """Per step, when one batch holds every row: the non-pad tokens of every sequence the policy reads and the
    completion tokens, from the rows a trainer is given (qlora-kit's tokenized pairs, or trl's own tokenization)."""
    if "chosen_input_ids" in dataset.column_names:  # ORPO / CPO: whole sequences, prompt positions labelled -100
        sides = ("chosen", "rejected")
        return {
            "processed": sum(len(ids) for side in sides for ids in dataset[f"{side}_input_ids"]),
            "loss": sum(sum(t != -100 for t in labels[1:]) for side in sides for labels in dataset[f"{side}_labels"]),
        }
    prompts = sum(len(ids) for ids in dataset["prompt_ids"])
    if "completion_ids" in dataset.column_names:  # KTO: the KL completions rotate the batch's own completions
        completions = sum(len(ids) for ids in dataset["completion_ids"])
        return {"processed": 2 * (prompts + completions), "loss": completions}
    completions = sum(len(ids) for side in ("chosen_ids", "rejected_ids") for ids in dataset[side])
    return {"processed": 2 * prompts + completions, "loss": completions}


def fed_by_each_side(recipe, tmp_path) -> dict[str, dict[str, int]]:
    """The toolkit side's tokenized rows, and what trl's own trainer tokenized from the raw rows (the baseline's)."""
    from qlora_kit.bench import plain
    from qlora_kit.data import preference as pref_data
    from qlora_kit.tokenizer import load_tokenizer

    toolkit = pref_data.build(recipe, load_tokenizer(recipe)).train
    baseline = plain.preference_trainer(recipe, {"max_steps": 1, "report_to": "none"}, tmp_path / "t").train_dataset
    return {"toolkit": fed_counts(toolkit), "baseline": fed_counts(baseline)}


def test_bench_train_dpo_counts_the_batches_both_sides_feed(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    path, recipe = preference_bench_recipe(tmp_path, tiny_model_dir, "dpo")
    out = tmp_path / "bench"
    assert main(["bench", "train", path, "--warmup-steps", "1", "--steps", "2", "--output-dir", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["method"] == "dpo" and set(report["sides"]) == {"toolkit", "baseline"}
    assert "not comparable with SFT" in report["tokens_note"]
    expected = fed_by_each_side(recipe, tmp_path)
    for name, side in report["sides"].items():
        assert side["method"] == "dpo" and side["measured_steps"] == 2 and side["tokens_per_second"] > 0
        assert side["loss_tokens_per_second"] > 0 and side["final_loss"] > 0 and side["mfu"] is None
        per_step = {key: side["tokens"][key] / 2 for key in ("processed", "loss", "sequences")}
        assert per_step == {**expected[name], "sequences": PAIRS * plan.SEQUENCES_PER_EXAMPLE["dpo"]}, name
        assert side["tokens"]["padded"] > side["tokens"]["processed"]  # sequences of several lengths are padded
    assert report["ratios"]["steps_per_second"] == pytest.approx(
        report["sides"]["toolkit"]["steps_per_second"] / report["sides"]["baseline"]["steps_per_second"]
    )
    markdown = (out / "bench.md").read_text()
    assert "(method dpo)" in markdown and "| input tokens/s (policy, no padding) |" in markdown
    assert "not comparable with SFT" in markdown and "| final train loss |" in markdown


@pytest.mark.parametrize("method", ["orpo", "kto", "kto-on-pairs", "simpo"])
def test_bench_train_sides_run_and_count_every_preference_method(tmp_path, tiny_model_dir, monkeypatch, method):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    # KTO on pairs: qlora-kit unpairs them, and the plain side hands them to KTOTrainer, which unpairs them itself.
    method, paired = method.removesuffix("-on-pairs"), method.endswith("-on-pairs")
    path, recipe = preference_bench_recipe(tmp_path, tiny_model_dir, method, paired)
    expected = fed_by_each_side(recipe, tmp_path)
    for side in ("toolkit", "baseline"):
        out = tmp_path / f"{side}.json"
        bench.run_side(side, path, [], 0, 1, out)
        result = json.loads(out.read_text())
        assert result["method"] == method and result["tokens_per_second"] > 0 and result["final_loss"] is not None
        # KTO: PAIRS unpaired rows, each read with its completion and with a mismatched KL completion.
        counted = {**expected[side], "sequences": PAIRS * plan.SEQUENCES_PER_EXAMPLE[method]}
        assert {k: result["tokens"][k] for k in counted} == counted, side


def test_bench_train_dpo_from_a_starting_adapter_keeps_it_frozen_as_the_reference(
    tmp_path, tiny_model_dir, monkeypatch
):
    from qlora_kit.bench import plain
    from qlora_kit.model import attach_lora, load_base_model
    from qlora_kit.tokenizer import load_tokenizer

    from .test_preference import write_recipe

    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    path, recipe = preference_bench_recipe(tmp_path, tiny_model_dir, "dpo")
    attach_lora(load_base_model(recipe, load_tokenizer(recipe)), recipe).save_pretrained(tmp_path / "sft-adapter")
    raw = yaml.safe_load(Path(path).read_text())
    raw["model"]["adapter"] = str(tmp_path / "sft-adapter")
    path = write_recipe(tmp_path, raw, "from-adapter.yaml")
    # The plain trl side: the adapter loaded trainable with peft, and trl's own frozen copy of it as the reference.
    trainer = plain.preference_trainer(load_recipe(path), {"max_steps": 1, "report_to": "none"}, tmp_path / "t")
    assert trainer.ref_model is None and sorted(trainer.model.peft_config) == ["default", "ref"]
    for side in ("toolkit", "baseline"):
        bench.run_side(side, path, [], 0, 1, tmp_path / f"{side}.json")
        result = json.loads((tmp_path / f"{side}.json").read_text())
        assert result["tokens"]["sequences"] == PAIRS * 2 and result["tokens_per_second"] > 0, side


def test_bench_train_preference_mistakes_are_one_error_line(tmp_path, tiny_model_dir, capsys):
    from .test_preference import preference_recipe, write_recipe

    pairs = sum_pairs(4)
    bad_pair = [*pairs, {"prompt": "q", "chosen": "a", "rejected": "a"}]  # KTO checks the pairs it unpairs
    kto = write_recipe(tmp_path, preference_recipe(tmp_path, tiny_model_dir, "kto", bad_pair, pairs), "kto.yaml")
    dpo = write_recipe(tmp_path, preference_recipe(tmp_path, tiny_model_dir, "dpo", pairs, pairs), "dpo.yaml")
    cases = {
        (kto,): f"error: {tmp_path / 'kto-train.jsonl'} line 5: chosen equals rejected",
        (dpo, f"model.adapter={tmp_path / 'missing'}"): "error: model.adapter: ",
    }
    for (recipe, *overrides), start in cases.items():
        out = tmp_path / "bench"
        assert main(["bench", "train", recipe, *overrides, "--output-dir", str(out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), lines
        assert "Traceback" not in lines[0] and not (out / "bench.json").exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, arithmetic_rows):
    tmp = tmp_path_factory.mktemp("gen")
    recipe = load_recipe(
        tiny_recipe(tmp, tiny_model_dir, arithmetic_rows), ["training.max_steps=2", "eval.num_samples=0"]
    )
    result = train(recipe, tmp / "run")
    shutil.copytree(tiny_model_dir, result.run_dir / "merged")  # any model folder stands in for a merged model
    return result.run_dir


def test_bench_generate_base_adapter_merged(run_dir):
    report = bench.bench_generate(run_dir, [1, 2], prompt_tokens=8, new_tokens=3, repeats=1)
    rows = report["results"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [
        ("base", 1),
        ("base", 2),
        ("adapter", 1),
        ("adapter", 2),
        ("merged", 1),
        ("merged", 2),
    ]
    for row in rows:
        assert row["prompt_tokens"] == 8 and row["new_tokens"] == 3
        # Both are timed separately (best of the repeats), so only their signs are certain on a shared machine.
        assert row["time_to_first_token_s"] > 0 and row["total_s"] > 0
        assert row["tokens_per_second"] == pytest.approx(row["batch_size"] * 3 / row["total_s"])
    markdown = bench.generate_markdown(report)
    assert markdown.count("\n| ") == 1 + len(rows) and "| adapter | 2 |" in markdown


def test_bench_generate_cli_on_a_model_folder(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "gen"
    args = [
        "bench",
        "generate",
        str(tiny_model_dir),
        "--batch-sizes",
        "1",
        "--prompt-tokens",
        "4",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--output-dir",
        str(out),
    ]
    assert main(args) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["model"] for r in report["results"]] == ["base"]
    assert (out / "bench.md").read_text().startswith("# bench generate")
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args[:3], "--batch-sizes", "1,x", "--force", "--output-dir", str(out)]) == 2
    assert main(["bench", "generate", str(tmp_path / "missing")]) == 2
