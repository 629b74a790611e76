"""Every recipe against the model it names, without downloading weights.

Each recipe's model is built on the meta device (no memory, no weights) from the public config.json values kept in
qlora_kit/architectures/, then wrapped with the recipe's LoRA config. A target module that does not exist, an
attention kernel the architecture does not support, or a config key that transformers no longer reads (so the model
silently gets a default and the wrong size) each fail here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from qlora_kit.errors import UserError
from qlora_kit.model import attach_lora
from qlora_kit.plan import shipped_name
from qlora_kit.recipe import load_recipe
from qlora_kit.resolve import resolve

from .conftest import DEMO_MODEL, REPO

RECIPE_DIR = REPO / "recipes"
ARCHITECTURE_DIR = REPO / "qlora_kit" / "architectures"
RECIPES = sorted(p for p in RECIPE_DIR.rglob("*.yaml") if "accelerate" not in p.relative_to(RECIPE_DIR).parts)

# recipe (relative to recipes/) -> architecture file (qlora_kit/architectures/<name>.json); "demo-base" is the
# bundled demo model's own config.json.
RECIPE_ARCHITECTURES = {
    "demo.yaml": "demo-base",
    "demo_dpo.yaml": "demo-base",
    "gemma/gemma-2-9b_capybara.yaml": "gemma-2-9b",
    "llama/llama-3.1-70b_tulu3.yaml": "llama-3.1-70b",
    "llama/llama-3.1-8b_ultrachat.yaml": "llama-3.1-8b",
    "llama/llama-3.1-8b_dpo_ultrafeedback.yaml": "llama-3.1-8b",
    "llama/llama-3.1-8b_glaive-toolcall.yaml": "llama-3.1-8b",
    "llama/llama-3.2-1b_alpaca-cleaned.yaml": "llama-3.2-1b",
    "llama/llama-3.2-3b_smoltalk.yaml": "llama-3.2-3b",
    "mistral/mistral-7b_guanaco.yaml": "mistral-7b",
    "mistral/mistral-7b_orpo_mix.yaml": "mistral-7b",
    "phi/phi-3.5-mini_no-robots.yaml": "phi-3.5-mini",
    "qwen/qwen2.5-7b_openhermes.yaml": "qwen2.5-7b",
    "qwen/qwen2.5-7b_kto_mix.yaml": "qwen2.5-7b",
    "qwen/qwen3-8b_multilingual-thinking.yaml": "qwen3-8b",
}

# Parameter counts published on the model cards, in billions: a config value that transformers ignores or that was
# copied wrong changes the size of the model built from it.
PUBLISHED_PARAMS_B = {
    "gemma-2-9b": 9.24,
    "llama-3.1-70b": 70.6,
    "llama-3.1-8b": 8.03,
    "llama-3.2-1b": 1.24,
    "llama-3.2-3b": 3.21,
    "mistral-7b": 7.25,
    "phi-3.5-mini": 3.82,
    "qwen2.5-7b": 7.62,
    "qwen3-8b": 8.19,
}


def architecture_name(name_or_path: str) -> str | None:
    """The shipped architecture a recipe's model maps to, by the planner's own rule; the demo model is its own."""
    return "demo-base" if Path(name_or_path).name == "demo-base" else shipped_name(name_or_path)


def architecture_config(name: str) -> dict:
    path = DEMO_MODEL / "config.json" if name == "demo-base" else ARCHITECTURE_DIR / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: add the model's public config.json values there")
    return json.loads(path.read_text())


def meta_model(config_values: dict, attn_implementation: str):
    """The full-size model on the meta device: the real module tree and shapes, no memory and no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config_values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def meta_lora(model, recipe):
    """qlora-kit's LoRA wrapping, with the adapter weights created on the meta device too (fast, no memory)."""
    with torch.device("meta"):
        return attach_lora(model, recipe)


def unmatched_targets(peft_model, target_modules: str | list[str]) -> list[str]:
    """Names in a target list that adapted no module (peft only fails when none of them match)."""
    if isinstance(target_modules, str):
        return []
    adapted = {name.split(".")[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    return [target for target in target_modules if target not in adapted]


def decoder_linears(model) -> int:
    return sum(isinstance(m, torch.nn.Linear) for name, m in model.named_modules() if "lm_head" not in name)


def test_every_recipe_names_its_architecture():
    found = {str(p.relative_to(RECIPE_DIR)) for p in RECIPES}
    assert found == set(RECIPE_ARCHITECTURES), "add new recipes to RECIPE_ARCHITECTURES (and remove deleted ones)"
    for relative, name in RECIPE_ARCHITECTURES.items():
        assert architecture_name(load_recipe(RECIPE_DIR / relative).model.name_or_path) == name, relative


def test_architecture_names():
    assert architecture_name("meta-llama/Llama-3.1-8B-Instruct") == "llama-3.1-8b"
    assert architecture_name("mistralai/Mistral-7B-Instruct-v0.3") == "mistral-7b"
    assert architecture_name("google/gemma-2-9b-it") == "gemma-2-9b"
    assert architecture_name("microsoft/Phi-3.5-mini-instruct") == "phi-3.5-mini"
    assert architecture_name("Qwen/Qwen2.5-7B-Instruct") == "qwen2.5-7b"
    assert architecture_name("models/demo-base") == "demo-base"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(RECIPE_DIR)))
def test_recipe_resolves_against_its_architecture(path: Path):
    recipe = load_recipe(path)
    name = RECIPE_ARCHITECTURES[str(path.relative_to(RECIPE_DIR))]
    values = architecture_config(name)
    model = meta_model(values, resolve(recipe).attn_implementation)
    assert type(model).__name__ == values["architectures"][0]

    # The config's values, not transformers' defaults, shaped the model.
    embeddings = model.get_input_embeddings().weight
    assert tuple(embeddings.shape) == (values["vocab_size"], values["hidden_size"])
    assert len(model.model.layers) == values["num_hidden_layers"]
    assert (model.lm_head.weight is embeddings) == model.config.tie_word_embeddings
    if name in PUBLISHED_PARAMS_B:
        billions = sum(p.numel() for p in model.parameters()) / 1e9
        assert billions == pytest.approx(PUBLISHED_PARAMS_B[name], rel=0.01), f"{name}: {billions:.3f}B parameters"

    linears = decoder_linears(model)
    peft_model = meta_lora(model, recipe)
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and not n.endswith("lm_head")]
    assert adapted, f"{path}: lora.target_modules matched no module"
    assert unmatched_targets(peft_model, recipe.lora.target_modules) == []
    if recipe.lora.target_modules == "all-linear":
        assert len(adapted) == linears  # every linear layer of the decoder, never the output head


def test_a_wrong_target_module_fails():
    overrides = ["lora.target_modules=[query_key_value]"]
    recipe = load_recipe(RECIPE_DIR / "llama/llama-3.2-1b_alpaca-cleaned.yaml", overrides)
    with pytest.raises(UserError, match="lora.target_modules"):
        meta_lora(meta_model(architecture_config("llama-3.2-1b"), "sdpa"), recipe)


def test_one_wrong_name_in_a_target_list_is_caught():
    # Phi-3's fused names on a Llama: o_proj and down_proj exist, qkv_proj and gate_up_proj do not. peft accepts
    # the list because some names match; attach_lora refuses it and lists the model's own names.
    overrides = ["lora.target_modules=[qkv_proj, o_proj, gate_up_proj, down_proj]"]
    recipe = load_recipe(RECIPE_DIR / "llama/llama-3.2-1b_alpaca-cleaned.yaml", overrides)
    with pytest.raises(UserError, match="'qkv_proj', 'gate_up_proj' not found in this model") as info:
        meta_lora(meta_model(architecture_config("llama-3.2-1b"), "sdpa"), recipe)
    assert "gate_proj, k_proj" in str(info.value)


def test_an_unsupported_attention_kernel_fails():
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        meta_model(architecture_config("gemma-2-9b"), "sdpa")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(RECIPE_DIR)))
def test_planner_plans_every_recipe_near_its_stated_memory(path: Path):
    """`qlora-kit plan` works offline for every recipe (fused projections and hub names included), and the memory a
    GPU recipe's header states stays within [0.7, 1.5]x of the planner's prediction for a GPU, so neither drifts
    far from the other. The 70B header is per GPU under FSDP, which shards what the planner counts for one process:
    only its plan is checked."""
    from qlora_kit.plan import ASSUMED_GPU, plan_recipe

    recipe = load_recipe(path)
    predicted = plan_recipe(recipe, machine=ASSUMED_GPU).total / 1e9
    stated = re.search(r"Expected peak GPU memory: about (\d+(?:\.\d+)?) GB", path.read_text())
    if path.name.startswith("demo") or "70b" in path.name:  # CPU demos state no GPU memory
        assert predicted > 0
        return
    assert stated, f"{path}: the header must state 'Expected peak GPU memory: about N GB'"
    assert 0.7 <= float(stated.group(1)) / predicted <= 1.5, (float(stated.group(1)), round(predicted, 2))
