"""Bad, unusual and hostile input, tried the way a careful user would: every case must exit 2 with one ``error:`` line
naming the culprit, show no traceback, and leave every input byte-identical. Grouped by class of failure."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from qlora_kit.cli import main

from .conftest import tiny_recipe


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(*roots: Path) -> dict[str, str]:
    """A digest of every file under ``roots``: compared before and after to prove nothing was touched."""
    digests = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A private copy of the tiny model, so a case that fails its check cannot harm the shared one."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def recipe(tmp_path, model_copy, arithmetic_rows):
    def make(**training) -> Path:
        return tiny_recipe(tmp_path, model_copy, arithmetic_rows, **{"max_steps": 2, **training})

    return make


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, arithmetic_rows) -> Path:
    """One finished run (2 steps, a checkpoint per step, a hub token given) that several cases below read."""
    tmp = tmp_path_factory.mktemp("trained")
    path = tiny_recipe(
        tmp,
        tiny_model_dir,
        arithmetic_rows,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        report_to=["tensorboard", "mlflow"],
        logging_steps=50,
        hub_token="hf_SeCrEtTokenThatMustNeverBeWritten",
    )
    code = main(["train", str(path), "--output-dir", str(tmp / "run")])
    assert code == 0
    return tmp / "run"


# ---------------------------------------------------------------------------------------------------------------
# Data loss: an output is never, never contains and never lies inside an input, whatever --force says


def test_merge_into_its_own_run_directory_is_refused(capsys, trained_run):
    before = snapshot(trained_run)
    code, err = run(capsys, "merge", str(trained_run), "--output", str(trained_run), "--force", "verify=false")
    assert_user_error(code, err, "--output", "adapter")
    assert snapshot(trained_run) == before


def test_train_over_the_base_model_is_refused(capsys, recipe, model_copy):
    path = recipe()
    before = snapshot(model_copy, path)
    code, err = run(capsys, "train", str(path), "--output-dir", str(model_copy), "--force")
    assert_user_error(code, err, "model.name_or_path", str(model_copy))
    assert snapshot(model_copy, path) == before


@pytest.mark.parametrize("where", ["data folder", "parent of the recipe"])
def test_train_over_its_data_or_recipe_is_refused(capsys, recipe, tmp_path, where):
    path = recipe()
    target = tmp_path if where == "data folder" else tmp_path.parent
    before = snapshot(tmp_path / "train.jsonl", path)
    code, err = run(capsys, "train", str(path), "--output-dir", str(target), "--force")
    assert_user_error(code, err, "contains")
    assert snapshot(tmp_path / "train.jsonl", path) == before


def test_train_into_the_data_cache_is_refused(capsys, recipe, tmp_path):
    path = recipe()
    raw = yaml.safe_load(path.read_text())
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    path.write_text(yaml.safe_dump(raw))
    code, err = run(capsys, "train", str(path), "--output-dir", str(tmp_path / "cache" / "run"))
    assert_user_error(code, err, "data.cache_dir", "lies inside")


# ---------------------------------------------------------------------------------------------------------------
# Secrets never reach a file the run writes


def test_hub_token_reaches_no_file_of_the_run(trained_run):
    secret = b"hf_SeCrEtTokenThatMustNeverBeWritten"
    files = [p for p in trained_run.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files)  # checkpoints keep their arguments (exact resume)
    assert any("events.out.tfevents" in p.name for p in files)
    assert any(p.parent.name == "params" and p.name == "learning_rate" for p in files)  # MLflow's store, in the run
    leaked = [str(p.relative_to(trained_run)) for p in files if secret in p.read_bytes()]
    assert leaked == []
    assert yaml.safe_load((trained_run / "recipe.yaml").read_text())["training"]["hub_token"] == "<redacted>"


# ---------------------------------------------------------------------------------------------------------------
# Runs are what they claim


def test_run_shorter_than_its_logging_interval_records_first_and_last_loss(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert metrics["train_loss_first"] > 0 and metrics["train_loss_last"] > 0
    assert metrics["train_loss_mean"] > 0


def test_zero_epochs_is_refused_before_anything_is_written(capsys, recipe, tmp_path):
    path = recipe(max_steps=-1, num_train_epochs=0)
    code, err = run(capsys, "train", str(path), "--output-dir", str(tmp_path / "run"))
    assert_user_error(code, err, "training.num_train_epochs")
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_unknown_target_module_lists_the_models_linear_modules(capsys, recipe, tmp_path):
    path = recipe()
    code, err = run(
        capsys, "train", str(path), "lora.target_modules=[q_proj, v_projj]", "--output-dir", str(tmp_path / "r")
    )
    line = assert_user_error(code, err, "lora.target_modules", "'v_projj'", "did you mean 'v_proj'", "down_proj")
    assert "'q_proj' not found" not in line


def test_max_length_beyond_the_models_positions_is_refused(capsys, recipe, tmp_path):
    path = recipe()
    code, err = run(capsys, "train", str(path), "data.max_length=100000", "--output-dir", str(tmp_path / "r"))
    assert_user_error(code, err, "data.max_length", "100000", "max_position_embeddings")


def test_duplicated_yaml_key_names_the_key_and_both_lines(capsys, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  name_or_path: x\nlora:\n  r: 8\n  r: 64\ndata:\n  train: [{path: a.jsonl}]\n")
    code, err = run(capsys, "validate", str(path))
    assert_user_error(code, err, "'r'", "lines 4 and 5", "dup.yaml")


# ---------------------------------------------------------------------------------------------------------------
# Trainer arguments the libraries reject: named by recipe key, caught by validate, before any weight loads


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("training.warmup_steps=-1", "training.warmup_steps"),
        ("training.logging_steps=0", "training.logging_steps"),
        ("training.learning_rate=.nan", "training.learning_rate"),
        ("training.bf16=true training.fp16=true", "training.bf16"),
        (
            "training.load_best_model_at_end=true training.eval_strategy=steps training.save_strategy=epoch",
            "training.load_best_model_at_end",
        ),
        ("training.lr_scheduler_type=cosine_foo", "training.lr_scheduler_type"),
        ("lora.r=100000", "lora.r"),
    ],
)
def test_rejected_trainer_settings_are_named_by_validate(capsys, recipe, override, key):
    code, err = run(capsys, "validate", str(recipe()), *override.split())
    assert_user_error(code, err, key)


def test_save_strategy_no_from_the_command_line_means_the_string(capsys, recipe):
    assert main(["validate", str(recipe()), "training.save_strategy=no"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out.split("ok:")[0])
    assert resolved["training"]["save_strategy"] == "no"


# ---------------------------------------------------------------------------------------------------------------
# Recipe files


def test_recipe_that_is_not_utf8_names_the_byte(capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  name_or_path: caf\xe9\n".encode("latin-1"))
    code, err = run(capsys, "validate", str(path))
    assert_user_error(code, err, "latin1.yaml", "not UTF-8", "byte 26", "line 2")


def test_directory_given_as_the_recipe(capsys, tmp_path):
    code, err = run(capsys, "validate", str(tmp_path))
    assert_user_error(code, err, str(tmp_path), "is a directory")


# ---------------------------------------------------------------------------------------------------------------
# Models and adapters that are damaged, unsafe or of the wrong kind


def test_pickle_checkpoint_holding_code_is_refused_by_name(capsys, recipe, model_copy, tmp_path):
    import torch

    (model_copy / "model.safetensors").unlink()
    torch.save({"payload": _CodeInPickle()}, model_copy / "pytorch_model.bin")
    before = snapshot(model_copy)
    code, err = run(capsys, "train", str(recipe()), "model.allow_pickle=true", "--output-dir", str(tmp_path / "r"))
    assert_user_error(code, err, "model.name_or_path", "pickle", "safetensors")
    assert snapshot(model_copy) == before and not (tmp_path / "pwned").exists()


class _CodeInPickle:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_truncated_model_safetensors_is_named(capsys, recipe, model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = run(capsys, "train", str(recipe()), "--output-dir", str(tmp_path / "r"))
    assert_user_error(code, err, "model.name_or_path", ".safetensors", "damaged")


def test_encoder_only_model_is_refused(capsys, recipe, model_copy, tmp_path, demo_tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    shutil.rmtree(model_copy)
    config = BertConfig(vocab_size=len(demo_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    BertForMaskedLM(config).save_pretrained(model_copy)
    demo_tokenizer.save_pretrained(model_copy)
    code, err = run(capsys, "train", str(recipe()), "--output-dir", str(tmp_path / "r"))
    assert_user_error(code, err, "model.name_or_path", "BertForMaskedLM", "not a causal")


@pytest.fixture
def run_copy(tmp_path, trained_run) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*")))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("truncate adapter_model.safetensors", "adapter_model.safetensors is damaged"),
        ("remove adapter_model.safetensors", "has no adapter_model.safetensors"),
        ("corrupt adapter_config.json", "adapter_config.json is damaged"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "merge"])
def test_damaged_adapter_is_named(capsys, run_copy, damage, needle, command):
    verb, _, name = damage.partition(" ")
    target = run_copy / "adapter" / name
    if verb == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif verb == "remove":
        target.unlink()
    else:
        target.write_text('{"peft_type": "LORA", ')
    before = snapshot(run_copy)
    code, err = run(capsys, command, str(run_copy))
    assert_user_error(code, err, name if command == "merge" and verb == "remove" else needle)
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------------------------------------------------------
# Output locations that cannot be written: refused before training starts


def test_output_under_an_existing_file(capsys, recipe, tmp_path):
    (tmp_path / "a-file").write_text("x")
    code, err = run(capsys, "train", str(recipe()), "--output-dir", str(tmp_path / "a-file" / "run"))
    assert_user_error(code, err, "a-file", "is a file")


def test_cache_dir_that_is_a_file(capsys, recipe, tmp_path):
    (tmp_path / "cache-file").write_text("x")
    code, err = run(
        capsys,
        "train",
        str(recipe()),
        f"data.cache_dir={tmp_path / 'cache-file'}",
        "--output-dir",
        str(tmp_path / "r"),
    )
    assert_user_error(code, err, "data.cache_dir", "cache-file", "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the check probes by writing")
def test_read_only_output_folder(capsys, recipe, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, err = run(capsys, "train", str(recipe()), "--output-dir", str(folder / "run"))
    finally:
        folder.chmod(0o755)
    assert_user_error(code, err, "locked", "cannot write")


# ---------------------------------------------------------------------------------------------------------------
# The error boundary and defaults


def test_a_bug_shows_its_traceback_and_asks_for_a_report(capsys, monkeypatch):
    from qlora_kit import cli

    def broken(args):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setitem(cli.COMMANDS, "validate", broken)
    code, err = run(capsys, "validate", "recipes/demo.yaml")
    assert code == 1
    assert "Traceback" in err and "RuntimeError: an internal invariant broke" in err
    assert "please report it" in err and "--debug" in err


def test_default_metrics_need_nothing_beyond_the_base_install():
    import tomllib

    from qlora_kit.recipe import EvalSection

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    needs = {"rouge": "rouge_score", "bleu": "sacrebleu", "chrf": "sacrebleu", "exact_match": None}
    for metric in EvalSection().metrics:
        assert needs[metric] is None or needs[metric] in core, metric


def test_bench_output_folders_are_new_each_time():
    from qlora_kit.cli import dated_folder

    first = dated_folder(Path("runs/bench/demo"))
    first.mkdir(parents=True)
    try:
        assert dated_folder(Path("runs/bench/demo")) != first
    finally:
        first.rmdir()


def test_missing_tokenizer_folder_is_named_by_its_own_key(capsys, recipe, tmp_path):
    code, err = run(capsys, "train", str(recipe()), "model.tokenizer_name_or_path=./no-such-tokenizer")
    assert_user_error(code, err, "model.tokenizer_name_or_path", "no-such-tokenizer", "does not exist")
