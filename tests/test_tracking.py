"""Tracking beyond TensorBoard: real runs reporting to MLflow's and trackio's local stores, read back with their own
clients."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from qlora_kit import tracking
from qlora_kit.cli import main

from .conftest import tiny_recipe

STEPS = 4


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory, tiny_model_dir, arithmetic_rows) -> Path:
    tmp = tmp_path_factory.mktemp("tracked")
    path = tiny_recipe(tmp, tiny_model_dir, arithmetic_rows, max_steps=STEPS, report_to="mlflow")
    assert main(["train", str(path), "--output-dir", str(tmp / "run")]) == 0
    return tmp / "run"


def client_and_id(run_dir: Path):
    import mlflow
    from mlflow.tracking._tracking_service import utils

    # MLflow caches each run's artifact folder per run id for the process; the copies below share the id.
    utils._artifact_repos_cache.clear()
    run_id = json.loads((run_dir / tracking.RECORD).read_text())["mlflow"]["run_id"]
    return mlflow.MlflowClient(tracking_uri=tracking.store_uri(run_dir)), run_id


def artifact_text(client, run_id: str, name: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, name, str(tmp_path))).read_text()


def test_mlflow_records_every_logged_loss_and_the_runs_files(mlflow_run, tmp_path):
    client, run_id = client_and_id(mlflow_run)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    metrics = json.loads((mlflow_run / "metrics.json").read_text())
    assert history[0].value == pytest.approx(metrics["train_loss_first"], abs=1e-6)
    assert history[-1].value == pytest.approx(metrics["train_loss_last"], abs=1e-6)
    assert float(run.data.params["learning_rate"]) == 3e-3  # the trainer's arguments, from transformers' callback
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["loss_curve.png", "metrics.json", "recipe.yaml"]
    assert artifact_text(client, run_id, "metrics.json", tmp_path) == (mlflow_run / "metrics.json").read_text()
    # The store was written in the staging folder; every path it records points at the published run.
    metas = "".join(p.read_text() for p in (mlflow_run / tracking.STORE).rglob("meta.yaml"))
    assert ".partial" not in metas and tracking.store_uri(mlflow_run) in metas
    assert not list(mlflow_run.parent.glob(".*.partial"))


def test_eval_of_a_moved_run_logs_into_the_same_mlflow_run(mlflow_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(mlflow_run, moved)  # a copy elsewhere: its store still records the old folder until repointed
    assert main(["eval", str(moved)]) == 0
    client, run_id = client_and_id(moved)
    assert sorted(a.path for a in client.list_artifacts(run_id, "eval")) == [
        "eval/eval.json",
        "eval/eval.md",
        "eval/eval.png",
        "eval/samples.jsonl",
    ]
    assert artifact_text(client, run_id, "eval/eval.json", tmp_path / "dl") == (moved / "eval.json").read_text()
    assert len(client.get_metric_history(run_id, "loss")) == STEPS
    assert str(mlflow_run) not in "".join(p.read_text() for p in (moved / tracking.STORE).rglob("meta.yaml"))


def test_export_logs_its_report_into_the_runs_mlflow_run(mlflow_run, tmp_path):
    from qlora_kit.export import export_run

    run = tmp_path / "run"
    shutil.copytree(mlflow_run, run)
    export_run(run, overrides=["types=[f32]", "verify=false"])  # llama.cpp's checks are test_export.py's subject
    client, run_id = client_and_id(run)
    listed = sorted(a.path for a in client.list_artifacts(run_id, "export"))
    assert listed == ["export/export.json", "export/export.md"]
    exported = json.loads(artifact_text(client, run_id, "export/export.json", tmp_path / "dl"))
    assert exported == json.loads((run / "gguf" / "export.json").read_text())


def test_resumed_run_continues_its_mlflow_run_with_the_same_losses(tmp_path, tiny_model_dir, arithmetic_rows):
    settings = {"max_steps": STEPS, "report_to": "mlflow", "save_strategy": "steps", "save_steps": 2}
    path = tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows, **settings)
    run = tmp_path / "run"
    assert main(["train", str(path), "--output-dir", str(run)]) == 0
    _, run_id = client_and_id(run)
    # Make it the run as it stood at its checkpoint of step 2: unfinished again, in its staging folder.
    staging = tmp_path / ".run.partial"
    run.rename(staging)
    for name in ("checkpoint-4", "adapter"):
        shutil.rmtree(staging / name)
    assert main(["train", str(path), "--output-dir", str(run), "--resume"]) == 0
    client, resumed_id = client_and_id(run)
    assert resumed_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    by_step = {}
    for metric in client.get_metric_history(run_id, "loss"):
        by_step.setdefault(metric.step, []).append(metric.value)
    assert sorted(by_step) == [1, 2, 3, 4] and [len(by_step[s]) for s in (1, 2, 3, 4)] == [1, 1, 2, 2]
    for step in (3, 4):  # steps 3 and 4 logged by the first run and again by the resumed one: the same numbers
        assert by_step[step][1] == pytest.approx(by_step[step][0], abs=1e-5)
    assert "metrics.json" in {a.path for a in client.list_artifacts(run_id)} and not staging.exists()


# ---------------------------------------------------------------------------------------------------------------
# trackio


@pytest.fixture(scope="module")
def trackio_run(tmp_path_factory, tiny_model_dir, arithmetic_rows) -> Path:
    tmp = tmp_path_factory.mktemp("trackio")
    settings = {"max_steps": STEPS, "report_to": ["tensorboard", "trackio"], "save_strategy": "steps", "save_steps": 2}
    path = tiny_recipe(tmp, tiny_model_dir, arithmetic_rows, **settings)
    assert main(["train", str(path), "--output-dir", str(tmp / "run")]) == 0
    return tmp / "run"


def trackio_record(run_dir: Path) -> dict:
    return json.loads((run_dir / tracking.RECORD).read_text())["trackio"]


def trackio_losses(record: dict) -> dict[int, list[float]]:
    from trackio.sqlite_storage import SQLiteStorage

    by_step = {}
    for row in SQLiteStorage.get_logs(record["project"], record["run"]):
        if "train/loss" in row:
            by_step.setdefault(row["train/global_step"], []).append(row["train/loss"])
    return by_step


def trackio_artifacts(record: dict) -> list[str]:
    """The run's artifacts as "type/file name" (trackio names them run-<run id>-<file name>)."""
    from trackio.sqlite_storage import SQLiteStorage

    links = SQLiteStorage.get_run_artifacts(record["project"], record["run"], None)["output"]
    return sorted(f"{link['type']}/{link['name'].rpartition('-')[2]}" for link in links)


def test_trackio_records_every_logged_loss_and_the_runs_files_in_its_local_store(trackio_run):
    record = trackio_record(trackio_run)
    # The suite's store (conftest sets TRACKIO_DIR); the project is the trainer's default, the name the folder's.
    assert record["store"] == os.environ["TRACKIO_DIR"] == str(tracking.trackio_store())
    assert record["project"] == "huggingface" and record["run"].startswith("run-")
    assert (Path(record["store"]) / "huggingface.db").is_file()
    losses = trackio_losses(record)
    metrics = json.loads((trackio_run / "metrics.json").read_text())
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[1][0] == pytest.approx(metrics["train_loss_first"], abs=1e-6)
    assert losses[STEPS][0] == pytest.approx(metrics["train_loss_last"], abs=1e-6)
    assert trackio_artifacts(record) == ["training/loss_curve.png", "training/metrics.json", "training/recipe.yaml"]


def test_eval_logs_its_report_into_the_runs_trackio_run(trackio_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trackio_run, run)
    assert main(["eval", str(run)]) == 0
    record = trackio_record(run)
    assert {"eval/eval.json", "eval/eval.md", "eval/samples.jsonl"} <= set(trackio_artifacts(record))
    assert sorted(trackio_losses(record)) == list(range(1, STEPS + 1))  # the same run, not a new one


def test_resumed_run_continues_its_trackio_run(trackio_run, tmp_path, tiny_model_dir, arithmetic_rows):
    # The run as it stood at its checkpoint of step 2: unfinished again, in its staging folder.
    staging = tmp_path / ".run.partial"
    shutil.copytree(trackio_run, staging)
    for name in ("checkpoint-4", "adapter"):
        shutil.rmtree(staging / name)
    first = trackio_record(staging)
    path = tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows, max_steps=STEPS, report_to="trackio",
                       save_strategy="steps", save_steps=2)  # fmt: skip
    assert main(["train", str(path), "--output-dir", str(tmp_path / "run"), "--resume"]) == 0
    assert trackio_record(tmp_path / "run")["run"] == first["run"]
    by_step = trackio_losses(first)
    assert [len(by_step[s]) for s in (1, 2, 3, 4)] == [1, 1, 2, 2]  # steps 3 and 4 again, from the checkpoint
    for step in (3, 4):
        assert by_step[step][1] == pytest.approx(by_step[step][0], abs=1e-5)


def test_a_preference_run_logs_to_mlflow_and_trackio_like_sft(tmp_path, tiny_model_dir):
    from .conftest import sum_pairs
    from .test_preference import preference_recipe, write_recipe

    raw = preference_recipe(tmp_path, tiny_model_dir, "dpo", sum_pairs(16), sum_pairs(8, seed=1), max_steps=STEPS)
    raw["training"]["report_to"] = ["mlflow", "trackio"]
    run = tmp_path / "run"
    assert main(["train", write_recipe(tmp_path, raw), "--output-dir", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    client, run_id = client_and_id(run)  # MLflow's store in the run directory, not the working directory's mlruns
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, STEPS + 1))
    assert client.get_metric_history(run_id, "loss")[-1].value == pytest.approx(metrics["train_loss_last"], abs=1e-6)
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["loss_curve.png", "metrics.json", "recipe.yaml"]
    record = trackio_record(run)
    assert sorted(trackio_losses(record)) == list(range(1, STEPS + 1))
    assert "training/metrics.json" in trackio_artifacts(record)
