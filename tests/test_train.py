"""Training for real: 4-bit base, LoRA, trl SFT steps. The loss falls, only LoRA moves, the adapter reloads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qlora_kit import model as model_stage
from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.recipe import load_recipe
from qlora_kit.train import train

from .conftest import REPO, tiny_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, arithmetic_rows):
    tmp = tmp_path_factory.mktemp("train")
    recipe = load_recipe(tiny_recipe(tmp, tiny_model_dir, arithmetic_rows))
    result = train(recipe, tmp / "run")
    return recipe, result


def test_run_directory_is_complete(trained):
    _, result = trained
    run = result.run_dir
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "recipe.yaml",
        "metrics.json",
        "loss_curve.png",
    ):
        assert (run / name).is_file(), name
    assert not (run.parent / f".{run.name}.partial").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "train_loss_first",
        "train_loss_last",
        "steps",
        "train_tokens",
        "train_runtime_s",
        "tokens_per_second",
        "peak_memory_bytes",
        "versions",
    ):
        assert key in metrics, key
    assert metrics["steps"] == 12 and metrics["train_tokens"] > 0 and metrics["peak_memory_bytes"] > 0
    # Input tokens include the prompts, trained tokens only the answers: both reported, named plainly.
    assert metrics["input_tokens"] > metrics["train_tokens"]
    assert metrics["input_tokens_per_second"] > metrics["trained_tokens_per_second"] > 0
    assert set(metrics["versions"]) >= {
        "torch",
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "accelerate",
        "datasets",
    }


def test_loss_goes_down(trained):
    _, result = trained
    assert result.metrics["train_loss_last"] < result.metrics["train_loss_first"] - 0.5
    comparison = result.metrics["comparison"]
    assert comparison["eval_loss_tuned"] < comparison["eval_loss_base"]


def test_base_is_really_4bit_and_unchanged(trained, tiny_model_dir):
    import bitsandbytes as bnb

    recipe, result = trained
    fresh = model_stage.load_base_model(recipe)
    trained_base = result.model.get_base_model()
    quantized = [n for n, m in trained_base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    fresh_state = fresh.state_dict()
    for name, tensor in trained_base.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(tensor, fresh_state[key]), f"base weight changed: {name}"


def test_every_lora_weight_changed(trained):
    recipe, result = trained
    from transformers import set_seed

    set_seed(recipe.training.get("seed", 42))
    untrained = model_stage.attach_lora(model_stage.load_base_model(recipe), recipe)
    before = {n: p for n, p in untrained.named_parameters() if "lora_" in n}
    after = {n: p for n, p in result.model.named_parameters() if "lora_" in n}
    assert before.keys() == after.keys() and len(after) == 2 * 7 * 2
    unchanged = [n for n in after if torch.equal(before[n], after[n].detach())]
    assert not unchanged, unchanged


def test_saved_adapter_reproduces_logits(trained):
    from peft import PeftModel

    recipe, result = trained
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    reloaded = PeftModel.from_pretrained(model_stage.load_base_model(recipe), str(result.run_dir / "adapter"))
    ids = tokenizer("What is 3 plus 4?", return_tensors="pt")["input_ids"]
    result.model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)


def test_cli_train_end_to_end(tmp_path, tiny_model_dir, arithmetic_rows):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows, max_steps=4)
    run = tmp_path / "cli-run"
    command = [sys.executable, "-m", "qlora_kit", "train", str(recipe), "--output-dir", str(run)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out: base vs fine-tuned" in result.stdout and "adapter:" in result.stdout
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already exists" in again.stderr
    forced = subprocess.run(
        [*command, "--force", "training.max_steps=1"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 1


def test_bf16_compute_keeps_frozen_weights_in_bf16(tmp_path, tiny_model_dir, arithmetic_rows):
    """peft upcasts every unquantized weight to fp32; under bf16 compute they go back to bf16 (half the memory), the
    forward runs without autocast, and a backward pass reaches the LoRA weights."""
    from qlora_kit import model as model_stage

    recipe = load_recipe(
        tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows), ["quantization.bnb_4bit_compute_dtype=bfloat16"]
    )
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    model = model_stage.attach_lora(model_stage.load_base_model(recipe, tokenizer), recipe)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [p for name, p in model.named_parameters() if "norm" in name]
    assert norms and all(p.dtype == torch.bfloat16 for p in norms)
    assert not [name for name, p in model.named_parameters() if p.dtype == torch.float32 and not p.requires_grad]
    ids = torch.tensor([tokenizer("What is 2 plus 3? 5")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    # lora_B starts at zero, so the first backward reaches every lora_B (lora_A's gradient is zero through B = 0).
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
