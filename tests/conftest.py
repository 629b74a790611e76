"""Shared fixtures: offline mode, the demo tokenizer, tiny random-weight models and small data files."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "demo-base"
if os.environ.get("QLORA_KIT_TEST_DEMO_MODEL"):  # lets a rebuilt demo model be tested before it is committed
    DEMO_MODEL = Path(os.environ["QLORA_KIT_TEST_DEMO_MODEL"])
DEMO_DATA = REPO / "data" / "demo"

# Set before any Hugging Face import, so nothing in the suite can reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# trackio's local store, read when trackio is imported: the suite's runs never land in the user's own store.
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="qlora-kit-tests-trackio-")


# Files whose tests train, merge, generate or launch processes: `make test-fast` leaves them out (`-m "not slow"`).
SLOW_FILES = {
    "test_adversarial.py",
    "test_bench.py",
    "test_data_pipeline.py",
    "test_evaluate.py",
    "test_merge.py",
    "test_notebooks.py",
    "test_readme.py",
    "test_resume.py",
    "test_train.py",
    "test_demo_loss.py",
    "test_tracking.py",
    "test_cli_errors.py",  # each case starts a fresh interpreter
    "test_preference.py",
    "test_gpu_suite.py",  # the suite's dry run trains, benchmarks and merges
    "test_sharded.py",  # FSDP2 over gloo: two CPU processes per run
}
SLOW_TESTS = {
    "test_ddp_on_two_cpu_processes_matches_one_process",
    "test_planner_plans_every_recipe_near_its_stated_memory",
    "test_generation_stops_at_end_of_turn_after_a_short_fine_tune",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat(user: str, assistant: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def sum_pairs(count: int, seed: int = 0, conversational: bool = True) -> list[dict]:
    """Prefer the correct sum over a wrong one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randrange(10), rng.randrange(10)
        prompt, right, wrong = f"What is {a} plus {b}?", str(a + b), str(a + b + rng.choice([-2, -1, 1, 2]))
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": right}],
                    "rejected": [{"role": "assistant", "content": wrong}],
                }
            )
        else:
            rows.append({"prompt": prompt + " ", "chosen": right, "rejected": wrong})
    return rows


def unpaired(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return out


@pytest.fixture(scope="session")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_tokenizer) -> Path:
    """A random-weight Llama of ~100k parameters with the demo tokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import LlamaForCausalLM

    from qlora_kit.demo_model import tiny_llama_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    config = tiny_llama_config(
        demo_tokenizer,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def arithmetic_rows() -> list[dict]:
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(48):
        a, b = rng.randrange(20), rng.randrange(20)
        rows.append(chat(f"What is {a} plus {b}?", str(a + b)))
    return rows


def tiny_recipe(tmp_path: Path, model_dir: Path, rows: list[dict], **training) -> Path:
    """Write a small recipe (and its data) that trains in seconds on CPU."""
    import yaml

    train = write_jsonl(tmp_path / "train.jsonl", rows[: len(rows) * 3 // 4])
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows[len(rows) * 3 // 4 :])
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"train": [{"path": str(train)}], "eval": {"path": str(held_out)}, "max_length": 64},
        "training": {
            "max_steps": 12,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "per_device_train_batch_size": 8,
            "report_to": "none",
            "save_strategy": "no",
            **training,
        },
        "eval": {"num_samples": 2, "max_new_tokens": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# Tiny random-weight models of several architectures, for tests that must hold beyond Llama.
TINY_ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "phi3": ("Phi3Config", {}),  # fused projections: qkv_proj and gate_up_proj
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),  # tied embeddings, biased q/k/v
    "mistral": ("MistralConfig", {}),
}


def save_tiny_causal_lm(path: Path, tokenizer, architecture: str, seed: int = 0, **overrides) -> Path:
    """Save a random-weight causal LM of ``architecture`` (2 layers, width 64) with ``tokenizer`` at ``path``."""
    import torch
    import transformers

    config_name, specific = TINY_ARCHITECTURES[architecture]
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **specific,
    )
    config = getattr(transformers, config_name)(**{**settings, **overrides})
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_architecture_dir(tmp_path_factory, demo_tokenizer):
    """``make(architecture)``: the folder of a tiny random-weight model of that architecture (built once)."""
    built: dict[str, Path] = {}

    def make(architecture: str) -> Path:
        if architecture not in built:
            built[architecture] = save_tiny_causal_lm(
                tmp_path_factory.mktemp(architecture), demo_tokenizer, architecture
            )
        return built[architecture]

    return make
