"""bench train / bench generate on tiny models on CPU: real trainer steps, real generation, well-formed reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from qlora_kit import bench, plan
from qlora_kit.cli import main
from qlora_kit.errors import UserError
from qlora_kit.recipe import load_recipe
from qlora_kit.train import train

from .conftest import DEMO_MODEL, REPO, tiny_recipe

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
    assert meter.pending == {"processed": 7, "loss": 4, "padded": 10}
    # Padding-free: one flattened row, no attention mask, each sequence's first label already -100.
    flat = {
        "input_ids": torch.full((1, 6), 9),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]]),
        "labels": torch.tensor([[-100, 7, 7, -100, -100, 7]]),
    }
    meter.count(flat, pad)
    assert meter.pending == {"processed": 13, "loss": 7, "padded": 16}
    # Packed rows kept apart: the second row ends in two pad tokens, which are not real tokens.
    rows = {
        "input_ids": torch.tensor([[9, 9, 9, 9], [9, 9, pad, pad]]),
        "position_ids": torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]]),
        "labels": torch.tensor([[-100, 7, -100, 7], [-100, 7, -100, -100]]),
    }
    meter.count(rows, pad)
    assert meter.pending == {"processed": 19, "loss": 10, "padded": 24}


def test_summary_skips_warmup_steps():
    meter = bench.Meter(started=0.0)
    meter.steps = [
        {"seconds": 9.0, "since_start": 12.0, "processed": 10, "loss": 5, "padded": 20},
        {"seconds": 1.0, "since_start": 13.0, "processed": 100, "loss": 50, "padded": 100},
        {"seconds": 3.0, "since_start": 16.0, "processed": 300, "loss": 10, "padded": 400},
    ]
    summary = bench.summarize(meter, warmup=1)
    assert summary["tokens_per_second"] == 100.0 and summary["loss_tokens_per_second"] == 15.0
    assert summary["padding_efficiency"] == 0.8 and summary["time_to_first_step_s"] == 12.0
    assert summary["step_time_mean_s"] == 2.0
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
