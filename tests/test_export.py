"""GGUF export for real: llama.cpp's converter and quantizer write the files, llama.cpp (llama-cpp-python) runs them.

The demo model with a real peft adapter on its 4-bit base (random adapter weights moved away from zero, as training
would) is merged, exported and compared with the merged transformers model: greedy tokens, perplexity, the chat-mode
prompt tokens and the GGUF metadata. Tiny random-weight models of other architectures check that the converter
accepts what merge writes. Nothing is mocked; llama.cpp must be installed (make setup), or these tests fail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qlora_kit.cli import main
from qlora_kit.errors import UserError
from qlora_kit.export import ExportFailed, export_run, ollama
from qlora_kit.merge import merge_run

from .conftest import DEMO_DATA, DEMO_MODEL, REPO
from .test_merge import make_run

FAST = ["verify_examples=8", "verify_generations=6", "max_new_tokens=16"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A run of the demo model on its own held-out data, merged (with verification) as `qlora-kit merge` does."""
    rows = [json.loads(line) for line in (DEMO_DATA / "eval.jsonl").read_text().splitlines()][:36]
    run = make_run(tmp_path_factory.mktemp("demo-export"), DEMO_MODEL, rows)
    merge_run(run, overrides=["verify_examples=4", "verify_generations=2"])
    return run


@pytest.fixture(scope="module")
def demo_export(demo_run) -> dict:
    return export_run(demo_run, overrides=["types=[f16,bf16,q8_0,q4_k_m]", *FAST]).report


@pytest.mark.slow
def test_f16_bf16_and_q8_0_generate_what_transformers_generates(demo_run, demo_export):
    check = demo_export["verification"]
    assert demo_export["complete"] and demo_export["failures"] == []
    for kind in ("f16", "bf16", "q8_0"):
        result = check["files"][kind]
        assert len(result["generations"]) == 6
        assert result["generation_agreement"] == 1.0, result["generations"]
        assert all(g["gguf"] == g["merged"] and g["merged"] for g in result["generations"])
    # f16 rounding moves held-out perplexity by well under its 0.5% limit; q4_k_m stays within its 10%.
    assert abs(check["files"]["f16"]["perplexity_increase"]) < 0.005
    assert abs(check["files"]["bf16"]["perplexity_increase"]) < 0.02
    assert abs(check["files"]["q8_0"]["perplexity_increase"]) < 0.02
    assert abs(check["files"]["q4_k_m"]["perplexity_increase"]) < 0.10
    assert check["files"]["q4_k_m"]["thresholds"]["max_perplexity_increase"] == 0.10
    assert check["loss_adapter"] == pytest.approx(check["loss_merged"], abs=1e-3)  # the merge is faithful
    assert math.exp(check["loss_merged"]) == pytest.approx(check["files"]["f16"]["perplexity"], rel=0.005)
    assert check["chat_template"] == {
        "checked": True,
        "identical": True,
        "tokens": pytest.approx(30, abs=20),
        "first_divergence": None,
    }
    output = demo_run / "gguf"
    names = ["run-bf16.gguf", "run-f16.gguf", "run-q4_k_m.gguf", "run-q8_0.gguf"]
    assert sorted(p.name for p in output.glob("*.gguf")) == names
    assert not list(demo_run.glob(".gguf*")), "the staging folder is gone"
    sizes = {kind: info["bytes"] for kind, info in demo_export["files"].items()}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]


@pytest.mark.slow
def test_gguf_metadata_carries_template_and_special_tokens(demo_run, demo_export, demo_tokenizer):
    from gguf import GGUFReader

    fields = GGUFReader(demo_run / "gguf" / "run-q8_0.gguf").fields
    value = {key: fields[key].contents() for key in fields if key.startswith(("tokenizer.ggml.", "tokenizer.chat"))}
    assert value["tokenizer.chat_template"] == demo_tokenizer.chat_template
    assert value["tokenizer.ggml.bos_token_id"] == demo_tokenizer.bos_token_id == 0
    assert value["tokenizer.ggml.eos_token_id"] == demo_tokenizer.eos_token_id == 0
    assert value["tokenizer.ggml.padding_token_id"] == demo_tokenizer.pad_token_id == 1
    assert value["tokenizer.ggml.eot_token_id"] == demo_tokenizer.convert_tokens_to_ids("<|im_end|>") == 3
    assert value["tokenizer.ggml.pre"] == demo_export["tokenizer"]["pre_tokenizer"] == "smollm"
    assert len(value["tokenizer.ggml.tokens"]) == len(demo_tokenizer) == 768


@pytest.mark.slow
def test_modelfile_and_reports(demo_run, demo_export):
    output = demo_run / "gguf"
    modelfile = (output / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./run-f16.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert ollama.CHATML in modelfile and demo_export["chat_family"] == "chatml"
    assert "ollama create run -f Modelfile" in (output / "README.md").read_text()
    assert json.loads((output / "export.json").read_text())["files"]["q8_0"]["file"] == "run-q8_0.gguf"
    table = (output / "export.md").read_text()
    assert "| run-q4_k_m.gguf | q4_k_m |" in table and "identical." in table


@pytest.mark.slow
def test_adapter_only_lora_on_base_gguf_matches_the_merged_gguf(demo_run, demo_export, tmp_path, demo_tokenizer):
    from qlora_kit.export import llamacpp
    from qlora_kit.export.verify import llama_greedy

    report = export_run(demo_run, tmp_path / "lora", ["adapter_only=true", "types=[f16]", *FAST]).report
    assert report["complete"]
    lora = tmp_path / "lora" / report["lora"]["file"]
    base = tmp_path / "lora" / "base-f16.gguf"
    merged_gguf = [g["gguf"] for g in demo_export["verification"]["files"]["f16"]["generations"]]
    assert [g["gguf"] for g in report["verification"]["files"]["f16"]["generations"]] == merged_gguf
    assert "ADAPTER ./run-lora-f32.gguf" in (tmp_path / "lora" / "Modelfile").read_text()
    # Without the LoRA, the base answers differently: the match above is the adapter's doing.
    prompt = demo_tokenizer("<|im_start|>user\nWhat is 4 plus 18?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    with_lora, alone = llamacpp.load(base, 64, 1, lora=lora), llamacpp.load(base, 64, 1)
    assert llama_greedy(with_lora, prompt, 8, [0, 3]) != llama_greedy(alone, prompt, 8, [0, 3])
    with_lora.close(), alone.close()


@pytest.mark.slow
def test_failed_verification_keeps_nothing(demo_run, tmp_path):
    target = tmp_path / "strict"
    with pytest.raises(ExportFailed, match=r"q4_k_m: perplexity \+[0-9.]+% > \+0% over the merged model"):
        export_run(demo_run, target, ["types=[q4_k_m]", "max_perplexity_increase.q4_k_m=0", *FAST])
    assert not target.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_output_never_overlaps_inputs_and_needs_force(demo_run, demo_export, capsys):
    for output in (demo_run, demo_run / "merged", demo_run / "adapter" / "gguf"):
        assert main(["export", str(demo_run), "--output", str(output), "--force"]) == 2
        error = capsys.readouterr().err
        assert "the export's input" in error and "never replaces an input" in error
    assert main(["export", str(demo_run)]) == 2
    assert "gguf already exists: pass --force" in capsys.readouterr().err
    with pytest.raises(UserError, match="export.types.0: Input should be"):
        export_run(demo_run, overrides=["types=[q3_k_s]"], force=True)


def write_sentencepiece_tokenizer(folder: Path, chat_template: str) -> None:
    """A 320-piece SentencePiece tokenizer (tokenizer.model, as Phi-3 and Gemma checkpoints ship), trained here on
    arithmetic questions, with Phi-3's chat markers as user-defined pieces and byte fallback for everything else."""
    import io
    import random

    import sentencepiece

    rng = random.Random(0)
    lines = [f"What is {rng.randrange(99)} plus {rng.randrange(99)}? {rng.randrange(199)}" for _ in range(3000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"],
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    # legacy: a "▁" opens every text piece between special tokens, as Phi-3's published tokenizer.json does
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "unk_token": "<unk>", "pad_token": "<|endoftext|>", "chat_template": chat_template}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def phi3_sentencepiece_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Phi-3 (fused qkv_proj and gate_up_proj) with a SentencePiece tokenizer, as on the hub."""
    from transformers import AutoTokenizer

    from qlora_kit.tokenizer import read_template

    from .conftest import save_tiny_causal_lm

    folder = tmp_path_factory.mktemp("phi3-sentencepiece")
    write_sentencepiece_tokenizer(folder, read_template("phi-3"))
    return save_tiny_causal_lm(folder, AutoTokenizer.from_pretrained(folder), "phi3")


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["qwen2-tied", "mistral", "phi3-sentencepiece"])
def test_converter_accepts_what_merge_writes(architecture, request, tiny_architecture_dir, arithmetic_rows, tmp_path):
    if architecture == "phi3-sentencepiece":  # llama.cpp reads Phi-3's vocabulary from tokenizer.model only
        model_dir = request.getfixturevalue("phi3_sentencepiece_dir")
    else:
        model_dir = tiny_architecture_dir(architecture)
    run = make_run(tmp_path, model_dir, arithmetic_rows)
    if architecture != "mistral":  # Mistral's run has no merged model yet: export merges (and verifies) it first
        merge_run(run, overrides=["verify=false"])
    report = export_run(run, overrides=["types=[f32]", "verify_examples=4", "verify_generations=4"]).report
    assert json.loads((run / "merged" / "merge_report.json").read_text())["complete"]
    result = report["verification"]["files"]["f32"]
    assert report["complete"], report["failures"]
    assert result["generation_agreement"] == 1.0
    assert abs(result["perplexity_increase"]) < 1e-3


@pytest.mark.parametrize("template", sorted((REPO / "qlora_kit" / "templates").glob("*.jinja")), ids=lambda p: p.stem)
def test_every_shipped_chat_format_has_an_ollama_template(template):
    name = template.stem
    assert ollama.family(template.read_text()) == name
    assert ollama.TEMPLATES[name].count("{{") == ollama.TEMPLATES[name].count("}}")


def test_disk_space_is_checked_before_writing(tmp_path):
    from qlora_kit.export.paths import BYTES_PER_WEIGHT, check_disk_space

    with pytest.raises(UserError, match=r"the export needs about 1000000000.00 GB, [0-9.]+ GB are free"):
        check_disk_space(tmp_path, 10**18)
    # A 7B model in q4_k_m needs about 4.3 GB: 7e9 weights x 4.9 bits / 8.
    assert 7e9 * BYTES_PER_WEIGHT["q4_k_m"] / 1e9 == pytest.approx(4.29, abs=0.01)
