"""User mistakes on the command line: exit status 2, one `error:` line naming the culprit, no traceback."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize(
    "content, needles",
    [
        # "café" in Latin-1: byte 0xe9 is not UTF-8; line 2 starts at byte 88, the bad byte is 16 bytes into it.
        (
            json.dumps(chat("a", "b")).encode() + b"\n" + b'{"text": "un caf\xe9 noir"}\n',
            ["bad.jsonl line 2", "not valid UTF-8 at byte offset 104 (byte 0xe9)"],
        ),
        (b'{"messages": [{"role": ["user"], "content": "a"}, {"role": "assistant", "content": "b"}]}\n', None),
        (b'{"messages": [{"role": 7, "content": "a"}, {"role": "assistant", "content": "b"}]}\n', None),
    ],
    ids=["invalid-utf8", "role-list", "role-number"],
)
def test_bad_bytes_and_roles_are_named_not_tracebacks(recipe_file, tmp_path, content, needles):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    result = run_cli("data", recipe_file(), f"data.train.0.path={bad}", "--examples", "0")
    assert_user_error(result, *(needles or ["bad.jsonl line 1", "messages[0] has unknown role"]))
    assert bad.read_bytes() == content  # reading never rewrites the user's file


def test_csv_and_tsv_cells_are_read_as_text(recipe_file, tmp_path):
    csv_file = tmp_path / "rows.csv"
    csv_file.write_bytes(b'prompt,completion\n"What is 50 + 2?"," 52"\n"And 7?","7"\n')
    tsv_file = tmp_path / "rows.tsv"
    tsv_file.write_bytes(b"prompt\tcompletion\nWhat is 50 + 2?\t 52\nAnd 7?\t007\n")
    from qlora_kit.data import read_source
    from qlora_kit.recipe import DataSource

    assert [r.data["completion"] for r in read_source(DataSource(path=str(csv_file)))] == [" 52", "7"]
    assert [r.data["completion"] for r in read_source(DataSource(path=str(tsv_file)))] == [" 52", "007"]
    result = run_cli("data", recipe_file(), f"data.train.0.path={csv_file}", "--examples", "0", "--plain")
    assert result.returncode == 0, result.stderr
    assert "prompt_completion" in result.stdout and "Traceback" not in result.stderr
