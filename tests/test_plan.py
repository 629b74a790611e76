"""The memory planner: formulas against hand-computed cases, 4-bit bytes against what bitsandbytes really allocates."""

from __future__ import annotations

import json

import pytest

from qlora_kit import model as model_stage
from qlora_kit import plan
from qlora_kit.bench import measured_quantized_bytes
from qlora_kit.cli import main
from qlora_kit.errors import UserError
from qlora_kit.plan import ASSUMED_GPU
from qlora_kit.recipe import load_recipe

from .conftest import tiny_recipe

# LLaMA-1 shapes from the LLaMA paper (Touvron et al. 2023, table 2), as the QLoRA paper used them.
LLAMA_7B = plan.Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=32000)
LLAMA_65B = plan.Shape(hidden=8192, intermediate=22016, layers=80, heads=64, kv_heads=64, head_dim=128, vocab=32000)


def test_quantization_constant_bits_match_the_qlora_paper():
    # QLoRA section 3: 32/64 = 0.5 bits per parameter without double quantization, 8/64 + 32/(64*256) = 0.127 with.
    assert plan.constant_bits_per_param(False) == 0.5
    assert plan.constant_bits_per_param(True) == pytest.approx(0.127, abs=5e-4)


def test_double_quantization_saves_about_3gb_on_65b():
    # QLoRA section 3: "a reduction of 0.373 bits per parameter ... around 3 GB for a 65B model".
    with_dq = plan.quantized_weight_bytes(LLAMA_65B, 4, True, 2)
    without = plan.quantized_weight_bytes(LLAMA_65B, 4, False, 2)
    assert LLAMA_65B.linear_params() == 80 * (4 * 8192**2 + 3 * 8192 * 22016) == 64_760_053_760
    assert (without - with_dq) / 1e9 == pytest.approx(3.0, abs=0.05)


def test_llama_7b_weight_breakdown_by_hand():
    n = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # 6,476,005,376 weights in the decoder linears
    assert LLAMA_7B.linear_params() == n
    per_layer = [4096 * 4096] * 4 + [4096 * 11008] * 3
    # Per tensor: n/2 packed bytes + n/64 8-bit absmax + 4 * ceil(n/64/256) fp32 + 4 offset + 64 NF4 code book
    # + 1024 second-level code book.
    by_hand = 32 * sum(m // 2 + m // 64 + 4 * -(-(m // 64) // 256) + 4 + 64 + 1024 for m in per_layer)
    assert plan.quantized_weight_bytes(LLAMA_7B, 4, True, 2) == by_hand
    assert by_hand / 2**30 == pytest.approx(3.11, abs=0.01)  # 4.127 bits x 6.48e9 / 8
    others = LLAMA_7B.other_params()
    assert others["embed_tokens"] == others["lm_head"] == 32000 * 4096
    assert others["norms"] == 65 * 4096
    # The whole 4-bit base with 16-bit embeddings: the QLoRA paper's "about 4 GB ... 7B" scale, far from 13.5 GB.
    base = by_hand + 2 * sum(others.values())
    assert 3.6e9 < base < 4.0e9


def test_lora_gradients_and_optimizer_by_hand():
    shape = plan.Shape.from_config(plan.arch_config("arch:llama-3.1-8b"))
    lora = plan.lora_tensors(shape, 16, list(plan.LORA_ALL_LINEAR))
    # Per layer r * sum(in + out): q 8192, k 5120, v 5120, o 8192, gate 18432, up 18432, down 18432 -> 81920 x 16.
    assert sum(lora) == 32 * 16 * 81920 == 41_943_040  # what peft prints for Llama-3.1-8B, r=16, all-linear
    assert plan.optimizer_bytes(lora, "adamw_torch", 2) == 2 * 2 * 41_943_040  # exp_avg + exp_avg_sq in bf16
    assert plan.optimizer_bytes(lora, "paged_adamw_8bit", 2) == sum(2 * n + 8 * -(-n // 256) for n in lora)
    assert plan.optimizer_bytes([100], "paged_adamw_8bit", 2) == 800  # under min_8bit_size: fp32 states
    assert plan.optimizer_bytes([1000], "paged_adamw_32bit", 2) == 8000
    with pytest.raises(UserError, match="training.optim"):
        plan.optimizer_bytes([10], "shampoo", 2)


def test_activation_formula_by_hand():
    shape = plan.Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=100)
    e, r = 2, 8
    targets = ["q_proj", "v_proj"]
    # attention: 64e + 2*64*4 + 64e + (64 + 2*32)e + 64e; MLP: 64e + 2*64*4 + 64e + 4*128e
    base = (64 + 64 + 128 + 64) * e + 512 + (64 + 64 + 512) * e + 512
    # LoRA with dropout: per target the input copy (64e) and mask (64), and A's output r*e.
    lora = 2 * (64 * e + 64 + r * e)
    got = plan.layer_activation_bytes(shape, e, r, targets, 0.1, "sdpa", 256)
    assert got == base + lora
    assert plan.layer_activation_bytes(shape, e, r, targets, 0.0, "sdpa", 256) == base + 2 * r * e
    assert plan.layer_activation_bytes(shape, e, r, targets, 0.0, "eager", 256) == base + 2 * r * e + 2 * 4 * 256 * e
    settings = plan.Settings(r=r, targets=targets, lora_dropout=0.0, batch_size=2, length=10, compute_bytes=e)
    checkpointed = plan.predict(shape, settings).parts["activations"]
    full = plan.predict(shape, plan.Settings(**{**settings.__dict__, "gradient_checkpointing": False}))
    assert checkpointed == 20 * (2 * 64 * e + base + 2 * r * e)  # each layer's input kept, one layer recomputed
    assert full.parts["activations"] == 20 * 2 * (base + 2 * r * e)
    # trl's chunked loss: per token the final hidden state (64e) and its fp32 gradient, 12 fp32 statistics; one
    # 20 x 100 tile of the logits in the compute dtype (a Triton kernel folds it in place).
    assert full.parts["logits"] == 20 * (64 * (e + 4) + 48) + 20 * 100 * e
    on_cpu = plan.predict(shape, plan.Settings(**{**settings.__dict__, "triton": False}))
    assert on_cpu.parts["logits"] == 20 * (64 * (e + 4) + 48) + 20 * 100 * (e + 7 * 4)
    # label_smoothing_factor > 0: trl builds the logits; per token vocab x (bf16 + fp32 copy + fp32 gradient).
    smoothed = plan.predict(shape, plan.Settings(**{**settings.__dict__, "full_logits": True}))
    assert smoothed.parts["logits"] == 20 * 100 * (2 + 4 + 4)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("llama-3.1-8b", 8_030_261_248),
        ("qwen2.5-7b", 7_615_616_512),
        ("mistral-7b", 7_248_023_552),  # v0.3: the 32,768-token vocabulary
        ("llama-3.1-70b", 70_553_706_496),
        ("phi-3.5-mini", 3_821_079_552),  # fused qkv_proj and gate_up_proj
    ],
)
def test_shipped_architectures_have_the_published_sizes(name, params):
    shape = plan.Shape.from_config(plan.arch_config(f"{plan.ARCH_PREFIX}{name}"))
    assert shape.total_params() == params


def test_planned_4bit_bytes_match_bitsandbytes(tmp_path, tiny_model_dir, arithmetic_rows):
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows))
    model = model_stage.load_base_model(recipe)
    measured = measured_quantized_bytes(model)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    predicted = plan.quantized_weight_bytes(plan.Shape.from_config(config), 4, True, 4)
    assert measured > 0
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def test_fused_projections_are_planned_by_their_own_names():
    phi = plan.Shape.from_config(plan.arch_config("arch:phi-3.5-mini"))
    assert plan.lora_targets("all-linear", phi) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    # qkv: 3072 -> 3 x 3072 (32 heads and 32 kv heads of 96); gate_up: 3072 -> 2 x 8192. Per layer r x (in + out):
    # (3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072) = 49,152, x 16 x 32 layers = 25,165,824.
    assert sum(plan.lora_tensors(phi, 16, plan.lora_targets("all-linear", phi))) == 25_165_824
    with pytest.raises(UserError, match="lora.target_modules: .*qkv_proj.*not q_proj"):
        plan.lora_targets(["q_proj"], phi)


def test_read_config_by_folder_arch_and_hub_name(tiny_model_dir):
    config, source = plan.read_config(str(tiny_model_dir))
    assert source.endswith("config.json") and config["hidden_size"] == 64
    assert plan.read_config("meta-llama/Llama-3.1-8B-Instruct")[1] == "arch:llama-3.1-8b"
    assert plan.read_config("mistralai/Mistral-7B-v0.1")[1] == "arch:mistral-7b"
    assert plan.read_config("mistralai/Mistral-7B-v0.3")[1] == "arch:mistral-7b"
    assert plan.read_config("Qwen/Qwen2.5-7B")[0]["hidden_size"] == 3584
    assert plan.arch_config("arch:llama-3.1-8b,num_hidden_layers=2")["num_hidden_layers"] == 2
    with pytest.raises(UserError, match="model.name_or_path.*arch:llama-3.1-8b"):
        plan.read_config("someone/unknown-model")
    with pytest.raises(UserError, match="unknown architecture"):
        plan.arch_config("arch:gpt-9")
    with pytest.raises(UserError, match="key=value"):
        plan.arch_config("arch:llama-3.1-8b,layers=2")


def test_parse_memory():
    assert plan.parse_memory("80GiB") == 80 * 2**30
    assert plan.parse_memory("24GB") == 24 * 10**9
    assert plan.parse_memory("48G") == 48 * 2**30
    with pytest.raises(UserError, match="--memory"):
        plan.parse_memory("lots")


def _recipe_8b(tmp_path, **training):
    import yaml

    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    raw = {
        "model": {"name_or_path": "meta-llama/Llama-3.1-8B"},
        "data": {"train": [{"path": str(tmp_path / "t.jsonl")}], "max_length": 2048},
        "training": {"per_device_train_batch_size": 8, **training},
    }
    path = tmp_path / "r8b.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plan_fits_and_suggests(tmp_path):
    recipe = load_recipe(_recipe_8b(tmp_path))
    big = plan.plan_recipe(recipe, 80 * 2**30, machine=ASSUMED_GPU)
    assert big.fits and not big.suggestions
    parts = big.parts
    assert parts["quantized_weights"] / 1e9 == pytest.approx(3.60, abs=0.01)
    # Embeddings and lm_head in bf16 (2 x 525M x 2 B), the norms in fp32: 2.10 GB, not peft's 4.20 GB of fp32.
    assert parts["unquantized_weights"] / 1e9 == pytest.approx(2.10, abs=0.01)
    small = plan.plan_recipe(recipe, 16 * 2**30, machine=ASSUMED_GPU)
    assert small.fits is False
    assert any("per_device_train_batch_size=" in tip for tip in small.suggestions), small.suggestions
    tiny = plan.plan_recipe(recipe, 6 * 2**30, machine=ASSUMED_GPU)
    assert tiny.suggestions and "nothing fits" in tiny.suggestions[-1]


def test_plan_cli(tmp_path, capsys):
    path = _recipe_8b(tmp_path)
    assert main(["plan", str(path), "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "quantized_weights" in out and "fits" in out and "does not fit" not in out
    assert main(["plan", str(path), "--gpu-memory", "12GB", "training.optim=paged_adamw_8bit"]) == 0
    assert "does not fit" in capsys.readouterr().out
    assert main(["plan", str(path), "--memory", "many"]) == 2
    assert "--memory" in capsys.readouterr().err


def test_loss_tiles_are_trls():
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    assert (plan.LOSS_TOKEN_TILE, plan.LOSS_VOCAB_TILE) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)


def test_each_checkpointing_choice_by_hand():
    shape = plan.Shape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=16, vocab=100)
    base = plan.Settings(r=8, targets=["q_proj"], lora_dropout=0.0, batch_size=1, length=10, compute_bytes=2)
    layer = plan.layer_activation_bytes(shape, 2, 8, ["q_proj"], 0.0, "sdpa", 10)

    def activations(**changes):
        return plan.predict(shape, plan.Settings(**{**base.__dict__, **changes})).parts["activations"] // 10

    assert activations() == 4 * 64 * 2 + layer  # every layer's input, one layer recomputed
    assert activations(gradient_checkpointing=False) == 4 * layer
    assert activations(every_n_layers=2) == 2 * 64 * 2 + 2 * layer + layer  # layers 0 and 2 checkpointed
    assert activations(selective=True) == 4 * (64 * 2 + 64 * 2 + 4 * 4) + layer  # + attention output and lse
    assert activations(offload_checkpoints=True) == layer  # the inputs wait in host memory
    assert activations(activation_offloading=True) == activations(activation_offloading=True, every_n_layers=3)
    assert activations(activation_offloading=True) == layer
    # Liger: each of the two RMSNorms keeps 4 bytes instead of 2 x 64 x 4, the SwiGLU 3 x 128 x 2 instead of 4 x.
    liger = plan.layer_activation_bytes(shape, 2, 8, ["q_proj"], 0.0, "sdpa", 10, liger=True)
    assert layer - liger == 2 * (2 * 64 * 4 - 4) + 128 * 2


def _longest(settings, shape, budget):
    return plan.longest_length(shape, settings, budget)


def test_longest_length_agrees_with_the_per_length_estimate():
    from dataclasses import replace

    shape = plan.Shape.from_config(plan.arch_config("arch:llama-3.1-8b"))
    settings = plan.Settings(optim="paged_adamw_8bit", batch_size=1)
    budget = 23 * 2**30
    for _, variant in plan.switch_variants(settings):
        longest = plan.longest_length(shape, variant, budget)
        assert longest > 0 and longest % plan.LENGTH_STEP == 0
        assert plan.predict(shape, replace(variant, length=longest)).total <= budget
        assert plan.predict(shape, replace(variant, length=longest + plan.LENGTH_STEP)).total > budget
    weights_only = plan.predict(shape, replace(settings, length=1)).total
    assert plan.longest_length(shape, settings, weights_only // 2) == 0


def test_each_switch_moves_the_longest_length_the_right_way():
    shape = plan.Shape.from_config(plan.arch_config("arch:llama-3.1-8b"))
    budget = 23 * 2**30
    recipe = plan.Settings(optim="paged_adamw_8bit", batch_size=1)
    longest = dict((label, plan.longest_length(shape, s, budget)) for label, s in plan.switch_variants(recipe))
    default = longest["as the recipe says"]
    key = "training.activation_checkpointing"
    assert longest[f"{key}=false"] < longest[f"{key}_kwargs.every_n_layers=2"] < default
    assert longest[f"{key}_kwargs.selective=true"] < default  # keeps attention outputs: faster, more memory
    assert longest[f"{key}_kwargs.offload=true"] > default
    assert longest["training.activation_offloading=true"] > default
    assert longest["training.use_liger_kernel=true"] > default
    assert longest["training.label_smoothing_factor>0 (full logits)"] < default
    # Starting from checkpointing off, turning it on is the switch that helps.
    off = plan.Settings(optim="paged_adamw_8bit", batch_size=1, gradient_checkpointing=False)
    flipped = dict(plan.switch_variants(off))
    assert plan.longest_length(shape, flipped[f"{key}=true"], budget) > plan.longest_length(shape, off, budget)
    # A bigger budget never gives a shorter length.
    assert plan.longest_length(shape, recipe, 40 * 2**30) > default


def test_recipe_switches_reach_the_plan(tmp_path):
    recipe = load_recipe(
        _recipe_8b(tmp_path),
        [
            "training.activation_checkpointing_kwargs={every_n_layers: 2, offload: true}",
            "training.use_liger_kernel=true",
            "training.label_smoothing_factor=0.1",
            "training.per_device_train_batch_size=1",
        ],
    )
    shape = plan.Shape.from_config(plan.arch_config("arch:llama-3.1-8b"))
    settings = plan.settings_from_recipe(recipe, ASSUMED_GPU, shape)
    assert (settings.every_n_layers, settings.offload_checkpoints, settings.liger, settings.full_logits) == (
        2,
        True,
        True,
        True,
    )
    assert settings.gradient_checkpointing and settings.triton
    off = load_recipe(_recipe_8b(tmp_path), ["training.activation_checkpointing=false"])
    assert plan.settings_from_recipe(off, ASSUMED_GPU, shape).gradient_checkpointing is False
    result = plan.plan_recipe(recipe, 24 * 2**30, ASSUMED_GPU)
    assert result.longest[0]["switch"] == "as the recipe says" and result.longest[0]["max_length"] > 0


def test_plan_cli_prints_the_longest_length(tmp_path, capsys):
    path = _recipe_8b(tmp_path)
    assert main(["plan", str(path), "--memory", "24GiB", "training.per_device_train_batch_size=1"]) == 0
    out = capsys.readouterr().out
    assert "longest data.max_length that fits, at batch 1" in out
    assert "training.activation_offloading=true" in out


def test_launch_doc_longest_length_table_is_the_planners(tmp_path):
    import re

    from .conftest import REPO

    text = (REPO / "docs" / "launch.md").read_text().split("## Long-context memory")[1]
    stated = [int(n.replace(",", "")) for n in re.findall(r"^\| .+? \| ([\d,]+) \|$", text, re.M)]
    overrides = ["training.per_device_train_batch_size=1", "training.optim=paged_adamw_8bit"]
    result = plan.plan_recipe(load_recipe(_recipe_8b(tmp_path), overrides), 24 * 2**30, ASSUMED_GPU)
    assert stated == [row["max_length"] for row in result.longest]
