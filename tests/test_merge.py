"""Merging for real: 4-bit bases of several architectures, real peft adapters, plain transformers loading the result.

Most runs here are built directly with peft on the real 4-bit base (random adapter weights, so every merge path is
exercised without spending minutes on training); one is trained with ``train`` so its recorded held-out loss can
catch a changed base. Reference logits always come from the saved adapter reloaded on the 4-bit base.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qlora_kit import model as model_stage
from qlora_kit.cli import main
from qlora_kit.errors import UserError
from qlora_kit.merge import merge_run
from qlora_kit.merge.base import roundtrip_4bit
from qlora_kit.merge.checkpoint import Checkpoint
from qlora_kit.recipe import resolved_dict, to_yaml, validate

from .conftest import REPO, save_tiny_causal_lm, tiny_recipe, write_jsonl

PROMPTS = [
    "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nSpell cat backwards.<|im_end|>\n<|im_start|>assistant\n",
]
FAST = ["verify_examples=4", "verify_generations=2", "eval.max_new_tokens=6"]


def make_run(
    tmp: Path,
    model_dir: Path,
    rows: list[dict],
    lora: dict | None = None,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    compute: str = "float32",
    **sections,
) -> Path:
    """A run directory as `train` writes it, with a real adapter on the real 4-bit base whose weights are random."""
    from qlora_kit.model import attach_lora, load_base_model
    from qlora_kit.tokenizer import load_tokenizer

    tmp.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(tmp / "train.jsonl", rows[:24])
    held_out = write_jsonl(tmp / "eval.jsonl", rows[24:36])
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **(lora or {})},
        "data": {"train": [{"path": str(train)}], "eval": {"path": str(held_out)}, "max_length": 64},
        "training": {"report_to": "none"},
        **sections,
    }
    if tokenizer_dir:
        raw["model"]["tokenizer_name_or_path"] = str(tokenizer_dir)
    recipe = validate(raw)
    tokenizer = load_tokenizer(recipe)
    torch.manual_seed(seed)
    peft_model = attach_lora(load_base_model(recipe, tokenizer), recipe)
    with torch.no_grad():  # what training would do: move every trainable tensor away from its initial value
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    run = tmp / "run"
    peft_model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    resolved = resolved_dict(recipe)
    resolved["quantization"]["bnb_4bit_compute_dtype"] = compute
    (run / "recipe.yaml").write_text(to_yaml(resolved))
    return run


def adapter_model(run: Path):
    from transformers import AutoTokenizer

    from qlora_kit.merge import load_run

    recipe, _ = load_run(run, [])
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    return model_stage.load_adapter_model(recipe, run / "adapter", tokenizer).eval(), tokenizer


def plain_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def logits_of(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return model(**batch).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Faithfulness


@pytest.mark.parametrize("architecture,dtype", [("llama", "float32"), ("llama", "bfloat16"), ("phi3", "float32")])
def test_roundtrip_is_bit_exact_with_the_loaded_4bit_weights(tiny_architecture_dir, architecture, dtype):
    import bitsandbytes as bnb
    from bitsandbytes import functional

    folder = tiny_architecture_dir(architecture)
    recipe = validate(
        {
            "model": {"name_or_path": str(folder), "dtype": dtype},
            "data": {"train": [{"path": "x"}]},
            "quantization": {"bnb_4bit_compute_dtype": "float32"},
        }
    )
    loaded = model_stage.load_base_model(recipe)
    checkpoint = Checkpoint(folder)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == (8 if architecture == "phi3" else 14)
    for name, layer in layers.items():
        trained_against = functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        mine = roundtrip_4bit(checkpoint.read(f"{name}.weight"), recipe, torch.device("cpu"))
        assert mine.dtype == trained_against.dtype == getattr(torch, dtype)
        assert torch.equal(mine, trained_against), name


@pytest.mark.parametrize(
    "architecture,lora",
    [
        ("llama", {"use_rslora": True, "use_dora": True}),  # plain LoRA on Llama: the trained run's verification below
        ("phi3", {}),
        ("qwen2-tied", {"bias": "all"}),
    ],
)
def test_dequantized_merge_reproduces_the_adapter_and_original_differs(
    tmp_path, tiny_architecture_dir, arithmetic_rows, architecture, lora
):
    run = make_run(tmp_path, tiny_architecture_dir(architecture), arithmetic_rows, lora)
    reference_model, tokenizer = adapter_model(run)
    reference = logits_of(reference_model, tokenizer)
    result = merge_run(run, tmp_path / "dequantized", ["verify=false", "max_shard_size=100KB"])
    merged = logits_of(plain_model(result.output), tokenizer)
    assert max_diff(merged, reference) < 1e-4  # float32 rounding of W + BA vs x@W + (x@A)@B
    assert result.report["counts"]["lora"] > 0 and result.report["counts"]["dequantized"] > 0
    assert result.report["shards"] > 1 and (result.output / "model.safetensors.index.json").is_file()
    if architecture == "qwen2-tied":
        assert (
            result.report["tied_embeddings"]
            and json.loads((result.output / "config.json").read_text())["tie_word_embeddings"]
        )
        assert result.report["adapters"][0]["replaced"], "bias: all saves the trained biases"
    original = merge_run(run, tmp_path / "original", ["verify=false", "strategy=original"])
    assert max_diff(logits_of(plain_model(original.output), tokenizer), reference) > 1e-3


def test_modules_to_save_added_tokens_and_untied_embeddings(
    tmp_path, tiny_architecture_dir, demo_tokenizer, arithmetic_rows
):
    from transformers import AutoTokenizer

    extended = AutoTokenizer.from_pretrained(tiny_architecture_dir("qwen2-tied"))
    extended.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    extended.save_pretrained(tmp_path / "tokenizer")
    run = make_run(
        tmp_path,
        tiny_architecture_dir("qwen2-tied"),
        arithmetic_rows,
        {"modules_to_save": ["lm_head"]},
        tokenizer_dir=tmp_path / "tokenizer",
    )
    reference_model, tokenizer = adapter_model(run)
    rows = reference_model.get_input_embeddings().weight.shape[0]
    assert rows == 832 and len(tokenizer) == len(demo_tokenizer) + 1  # resized to a multiple of 64
    result = merge_run(run, tmp_path / "merged", ["verify=false"])
    merged_model = plain_model(result.output)
    assert max_diff(logits_of(merged_model, tokenizer), logits_of(reference_model, tokenizer)) < 1e-4
    config = json.loads((result.output / "config.json").read_text())
    assert config["vocab_size"] == rows and config["tie_word_embeddings"] is False
    assert not result.report["tied_embeddings"] and "lm_head.weight" in result.report["adapters"][0]["replaced"]
    saved = AutoTokenizer.from_pretrained(result.output)
    assert saved.convert_tokens_to_ids("<|tool|>") == len(demo_tokenizer)
    trained_head = reference_model.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(merged_model.lm_head.weight, trained_head)


def test_weighted_adapters_combine_linearly_and_verify(tmp_path, tiny_architecture_dir, arithmetic_rows):
    from safetensors.torch import load_file

    model_dir = tiny_architecture_dir("llama")
    first = make_run(tmp_path / "a", model_dir, arithmetic_rows, seed=1)
    second = make_run(tmp_path / "b", model_dir, arithmetic_rows, {"r": 4, "use_rslora": True}, seed=2)

    def weights(run: Path, *overrides: str) -> dict[str, torch.Tensor]:
        output = run.parent / ("m" + "".join(o.replace("/", "_") for o in overrides))
        merge_run(run, output, ["verify=false", *overrides])
        return load_file(output / "model.safetensors")

    base = weights(first, "weight=0")
    alone_a, alone_b = weights(first), weights(second)
    combined = merge_run(
        first, tmp_path / "combined", [*FAST, "weight=0.7", f"adapters=[{{path: {second}, weight: -0.4}}]"]
    )
    mixed = load_file(combined.output / "model.safetensors")
    for name, tensor in mixed.items():
        expected = base[name] + 0.7 * (alone_a[name] - base[name]) - 0.4 * (alone_b[name] - base[name])
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-5)
    verification = combined.report["verification"]
    assert verification["passed"] and verification["max_abs_logit_diff"] < 1e-4
    assert verification["generation_agreement"] == 1.0 and len(verification["generations"]) == 2


@pytest.mark.parametrize("architecture", ["llama", "qwen2-tied"])
def test_float32_compute_keeps_16bit_storage_and_computes_the_upcast_weights(tiny_architecture_dir, architecture):
    from transformers import AutoModelForCausalLM

    folder = tiny_architecture_dir(architecture)
    ids = torch.tensor([[1, 5, 9, 200, 33, 47, 300, 2, 8]])
    stored = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    upcast_copy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).float().eval()
    assert model_stage.compute_in_float32(stored) > 0
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}  # no float32 copy of the model is kept
    with torch.no_grad():
        logits = stored(input_ids=ids).logits
    assert logits.dtype == torch.float32 and torch.equal(logits, upcast_copy(input_ids=ids).logits)


def test_a_bf16_run_is_verified_in_float32(tmp_path, tiny_architecture_dir, arithmetic_rows, capsys):
    """A bf16 run merged into float32 reproduces the adapter to float32 rounding, and the verification sees that:
    it computes both sides in float32 (computed in bf16, they differ by about 1e-2 here, and more with depth). The
    base check before it still runs in bf16, as training evaluated (on CPUs with AVX512-BF16 bitsandbytes then
    re-packs the 4-bit weights with bf16 scales, and the reference is loaded again)."""
    from qlora_kit.evaluate import heldout_loss
    from qlora_kit.merge import load_run
    from qlora_kit.merge.verify import verification_set

    model = {"name_or_path": str(tiny_architecture_dir("llama")), "dtype": "bfloat16"}
    run = make_run(tmp_path, tiny_architecture_dir("llama"), arithmetic_rows, compute="bfloat16", model=model)
    reference, tokenizer = adapter_model(run)
    held_out = verification_set(load_run(run, [])[0], tokenizer).eval_dataset
    recorded = heldout_loss(reference, held_out, tokenizer.pad_token_id)  # what train records, in bf16
    (run / "metrics.json").write_text(json.dumps({"comparison": {"eval_loss_tuned": recorded}}))
    verification = merge_run(run, tmp_path / "merged", [*FAST, "dtype=float32"]).report["verification"]
    assert verification["compute_dtype"] == "float32" and verification["passed"]
    assert verification["base_check"]["checked"] and verification["base_check"]["eval_loss_now"] == recorded
    assert verification["max_abs_logit_diff"] < 1e-4 and verification["loss_diff"] < 1e-5, verification
    capsys.readouterr()
    strict = [*FAST, "dtype=bfloat16", "mean_abs_logit_diff=1e-9"]
    assert main(["merge", str(run), "--output", str(tmp_path / "bf16"), *strict]) == 1
    error = capsys.readouterr().err.strip()  # a bf16 merge that fails says what a float32 one would keep
    assert len(error.splitlines()) == 1 and error.endswith("merge.dtype=float32 keeps them")


def test_a_bf16_dora_run_is_verified_in_float32(tmp_path, tiny_architecture_dir, arithmetic_rows):
    """DoRA reads the dequantized base weight itself (for its norms) beside the 4-bit layer's float32 forward."""
    model = {"name_or_path": str(tiny_architecture_dir("llama")), "dtype": "bfloat16"}
    lora = {"use_dora": True, "use_rslora": True}
    run = make_run(tmp_path, tiny_architecture_dir("llama"), arithmetic_rows, lora, compute="bfloat16", model=model)
    verification = merge_run(run, tmp_path / "merged", [*FAST, "dtype=float32"]).report["verification"]
    assert verification["passed"] and verification["max_abs_logit_diff"] < 1e-4, verification


# ---------------------------------------------------------------------------------------------------------------
# A trained run: CLI end to end, deployment files, verification failures, a changed base


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_architecture_dir, arithmetic_rows):
    from qlora_kit.recipe import load_recipe
    from qlora_kit.train import train

    tmp = tmp_path_factory.mktemp("merge-train")
    recipe = load_recipe(tiny_recipe(tmp, tiny_architecture_dir("llama"), arithmetic_rows, max_steps=3))
    return train(recipe, tmp / "run").run_dir


@pytest.fixture(scope="module")
def cli_merged(trained_run, tmp_path_factory) -> tuple[Path, str]:
    """`qlora-kit merge RUN --output DIR` with verification on; the folder and what the command printed."""
    import contextlib
    import io

    output = tmp_path_factory.mktemp("cli-merge") / "merged"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["merge", str(trained_run), "--output", str(output), *FAST]) == 0
    return output, printed.getvalue()


def test_cli_merge_verifies_and_writes_a_deployable_folder(trained_run, cli_merged, tmp_path, capsys):
    from transformers import AutoTokenizer

    output, printed = cli_merged
    assert "merged vs adapter on the 4-bit base" in printed and "identical greedy generations" in printed
    report = json.loads((output / "merge_report.json").read_text())
    verification = report["verification"]
    assert report["complete"] and verification["passed"] and verification["base_check"]["checked"]
    assert verification["max_abs_logit_diff"] < 1e-4 and verification["loss_diff"] < 1e-5
    assert verification["generation_agreement"] == 1.0
    config = json.loads((output / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    generation = json.loads((output / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    assert tokenizer.eos_token_id in generation["eos_token_id"]
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(trained_run / "adapter").chat_template
    card = (output / "README.md").read_text()
    assert "strategy: `dequantized`" in card and "max abs logit difference" in card and "```yaml" in card

    assert "already exists" in _user_error(capsys, "merge", str(trained_run), "--output", str(output))
    old = tmp_path / "old"
    old.mkdir()
    (old / "stale.txt").write_text("from an earlier merge")
    assert main(["merge", str(trained_run), "--output", str(old), "--force", "verify=false"]) == 0
    assert not (old / "stale.txt").exists() and (old / "model.safetensors").is_file()
    assert json.loads((old / "merge_report.json").read_text())["verification"] is None


def test_merged_folder_needs_neither_peft_nor_bitsandbytes(trained_run, cli_merged, tmp_path):
    """Load and generate where peft and bitsandbytes cannot be imported; the greedy text equals the adapter's."""
    from qlora_kit.evaluate import generate

    output, _ = cli_merged
    model, tokenizer = adapter_model(trained_run)
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=1)
    site = tmp_path / "site"
    site.mkdir()
    packages = Path(torch.__file__).parents[1]
    for entry in packages.iterdir():
        if not entry.name.lower().startswith(("peft", "bitsandbytes")):
            (site / entry.name).symlink_to(entry)
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        assert importlib.util.find_spec("peft") is None and importlib.util.find_spec("bitsandbytes") is None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(output)!r})
        tokenizer = AutoTokenizer.from_pretrained({str(output)!r})
        texts = []
        for prompt in {PROMPTS!r}:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=8, do_sample=False)  # EOS from generation_config.json
            texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        print(json.dumps(texts))
    """)
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_divergence_beyond_thresholds_fails_and_publishes_nothing(trained_run, tmp_path, capsys):
    output = tmp_path / "merged"
    capsys.readouterr()
    code = main(
        [
            "merge",
            str(trained_run),
            "--output",
            str(output),
            *FAST,
            "strategy=original",
            "enforce_thresholds=true",
            "mean_abs_logit_diff=1e-9",
        ]
    )
    printed = capsys.readouterr()
    assert code == 1 and not output.exists()
    assert "note: the original base differs from the trained model" in printed.out
    assert printed.err.strip().startswith("error: verification failed:") and "mean abs logit diff" in printed.err
    assert len(printed.err.strip().splitlines()) == 1
    report = json.loads((tmp_path / ".merged.partial" / "merge_report.json").read_text())
    assert report["complete"] is False and report["strategy"] == "original"
    assert report["verification"]["mean_abs_logit_diff"] > 1e-3  # the original base differs measurably


def test_a_changed_base_is_caught_by_the_recorded_loss(trained_run, tmp_path, demo_tokenizer, capsys):
    other = save_tiny_causal_lm(tmp_path / "other-revision", demo_tokenizer, "llama", seed=1)
    capsys.readouterr()
    code = main(["merge", str(trained_run), "--output", str(tmp_path / "m"), f"model.name_or_path={other}", *FAST])
    assert code == 2 and not (tmp_path / "m").exists()
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "not the one the adapter was trained against" in error
    assert len(error.splitlines()) == 1 and not list(tmp_path.glob(".m*"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one error line, nothing left behind


def _user_error(capsys, *argv: str) -> str:
    capsys.readouterr()  # drop what earlier steps printed
    assert main(list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, tiny_architecture_dir, arithmetic_rows, demo_tokenizer, capsys):
    run = make_run(tmp_path / "llama", tiny_architecture_dir("llama"), arithmetic_rows)
    (tmp_path / "empty").mkdir()
    assert "has no adapter/adapter_config.json" in _user_error(capsys, "merge", str(tmp_path / "empty"))
    out = str(tmp_path / "out")
    phi3 = tiny_architecture_dir("phi3")
    assert "does not match the base" in _user_error(
        capsys, "merge", str(run), "--output", out, f"model.name_or_path={phi3}"
    )
    wider = save_tiny_causal_lm(tmp_path / "wider", demo_tokenizer, "llama", hidden_size=128)
    message = _user_error(capsys, "merge", str(run), "--output", out, f"model.name_or_path={wider}")
    assert "does not match the base" in message and "trained on another model" in message
    assert "merge.strategy" in _user_error(capsys, "merge", str(run), "--output", out, "strategy=best")
    (tmp_path / "taken").mkdir()
    assert "already exists" in _user_error(capsys, "merge", str(run), "--output", str(tmp_path / "taken"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_not_enough_disk_space_is_refused_before_writing(
    tmp_path, tiny_architecture_dir, arithmetic_rows, monkeypatch
):
    run = make_run(tmp_path, tiny_architecture_dir("llama"), arithmetic_rows)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="not enough disk space"):
        merge_run(run, tmp_path / "merged", ["verify=false"])
    assert not list(tmp_path.glob("*merged*"))


def test_disk_full_while_writing_leaves_nothing(tmp_path, tiny_architecture_dir, arithmetic_rows, capsys):
    """A real write failure: a file size limit makes the shard write fail part way (EFBIG), as a full disk would."""
    import resource

    run = make_run(tmp_path, tiny_architecture_dir("llama"), arithmetic_rows)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        message = _user_error(capsys, "merge", str(run), "--output", str(tmp_path / "merged"), "verify=false")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert message.startswith("error: no disk space left writing the merge")
    assert not list(tmp_path.glob("*merged*"))


# ---------------------------------------------------------------------------------------------------------------
# Streaming: peak memory and interruption, on a sharded model of a few hundred MB


@pytest.fixture(scope="module")
def big_run(tmp_path_factory, demo_tokenizer, arithmetic_rows):
    """A 218 MB float32 Llama (mostly its two 82 MB embeddings) in shards of at most 100 MB, and an adapter."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_kit.model import lora_config

    tmp = tmp_path_factory.mktemp("big")
    config = LlamaConfig(
        vocab_size=40000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        bos_token_id=demo_tokenizer.bos_token_id,
        eos_token_id=demo_tokenizer.eos_token_id,
        pad_token_id=demo_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp / "base", max_shard_size="100MB")
    demo_tokenizer.save_pretrained(tmp / "base")
    recipe = validate(
        {
            "model": {"name_or_path": str(tmp / "base")},
            "lora": {"r": 8},
            "data": {"train": [{"path": str(write_jsonl(tmp / "t.jsonl", arithmetic_rows))}]},
            "quantization": {"bnb_4bit_compute_dtype": "float32"},
        }
    )
    run = tmp / "run"
    get_peft_model(model, lora_config(recipe)).save_pretrained(run / "adapter")
    demo_tokenizer.save_pretrained(run / "adapter")
    (run / "recipe.yaml").write_text(to_yaml(resolved_dict(recipe)))
    del model
    return run


def test_killed_merge_leaves_nothing_complete(big_run):
    output = big_run / "merged"
    command = [sys.executable, "-m", "qlora_kit", "merge", str(big_run), "verify=false", "max_shard_size=30MB"]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = big_run / ".merged.partial"
    deadline = time.monotonic() + 240
    while not list(staging.glob("*.safetensors")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the merge finished before it could be interrupted"
    assert not output.exists() and not (staging / "merge_report.json").exists()


def test_streaming_merge_peak_memory_stays_near_one_shard(big_run, trained_run, tmp_path):
    """Peak RSS of a merge in a fresh process: at most 1.5 x the largest shard + the adapter + the process's own
    footprint, measured after a warm-up merge of a tiny model (imports, kernels and allocator all loaded)."""
    warm = trained_run
    script = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from qlora_kit.merge import merge_run

        def status(field):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

        merge_run(Path({str(warm)!r}), Path({str(tmp_path / "warm")!r}), ["verify=false"])
        baseline = status("VmHWM")
        report = merge_run(Path({str(big_run)!r}), None, ["verify=false", "max_shard_size=30MB"], force=True).report
        print(json.dumps({{"baseline": baseline, "peak": status("VmHWM"), "report": report}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    report = measured["report"]
    largest = Checkpoint(big_run.parent / "base").largest_file_bytes
    adapter = (big_run / "adapter" / "adapter_model.safetensors").stat().st_size
    model_bytes = sum(p.stat().st_size for p in (big_run.parent / "base").glob("*.safetensors"))
    assert model_bytes > 200e6 and 1.5 * largest + adapter < model_bytes  # so holding the model would fail
    growth = measured["peak"] - measured["baseline"]
    assert growth < 1.5 * largest + adapter, (growth / 2**20, largest / 2**20)
    assert report["shards"] > 1 and report["counts"]["dequantized"] == 4 * 7
    assert not (big_run / ".merged.partial").exists() and (big_run / "merged" / "config.json").is_file()
