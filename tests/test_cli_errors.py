"""User mistakes on the command line: exit status 2, one `error:` line naming the culprit, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from .conftest import REPO, chat, write_jsonl


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_kit", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def recipe_file(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [chat("hi", "hello")] * 4)

    def make(**changes) -> str:
        recipe = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": [{"path": str(train)}]},
            "training": {"max_steps": 1, "report_to": "none"},
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in changes.items():
            section, _, field = key.partition("__")
            recipe.setdefault(section, {})[field] = value
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return str(path)

    return make


def test_missing_recipe_file(tmp_path):
    assert_user_error(run_cli("validate", str(tmp_path / "nope.yaml")), "nope.yaml does not exist")


def test_validate_ok_prints_resolved_recipe():
    result = run_cli("validate", "recipes/demo.yaml", "lora.r=4")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout.split("ok:")[0])
    assert resolved["lora"]["r"] == 4 and resolved["training"]["learning_rate"] > 0


def test_unknown_key_and_negative_learning_rate(recipe_file):
    result = run_cli("validate", recipe_file(), "lora.dropout=0.1", "training.learning_rate=-1")
    assert_user_error(
        result,
        "2 problems",
        "lora.dropout: unknown key (did you mean 'lora_dropout'?)",
        "training.learning_rate: must be > 0",
    )


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "validate", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_missing_data_file(recipe_file, tmp_path):
    result = run_cli("train", recipe_file(), f"data.train.0.path={tmp_path}/missing.jsonl")
    assert_user_error(result, "missing.jsonl does not exist")


def test_rows_missing_columns(recipe_file, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("a", "b"), {"prompt": "no messages"}])
    result = run_cli("train", recipe_file(), f"data.train.0.path={bad}", "data.train.0.format=messages")
    assert_user_error(result, "bad.jsonl line 2", "missing column 'messages'")


def test_model_path_that_does_not_exist(recipe_file, tmp_path):
    result = run_cli("train", recipe_file(), f"model.name_or_path={tmp_path}/no-model")
    assert_user_error(result, "model.name_or_path", "does not exist")


def test_existing_run_dir_is_not_overwritten(recipe_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    assert_user_error(run_cli("train", recipe_file()), "already exists", "--force")
    assert (run / "keep.txt").read_text() == "mine"
