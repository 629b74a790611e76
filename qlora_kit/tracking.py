"""Experiment tracking beyond TensorBoard: an MLflow store inside the run directory, and the run's files as artifacts.

transformers' own MLflowCallback (``training.report_to: mlflow``) logs the trainer's arguments and every logged loss.
This module adds what it lacks:

- where the store lives: ``RUN_DIR/mlruns``, MLflow's local file store (no server, works offline), unless
  MLFLOW_TRACKING_URI names another store, which is then used as given;
- the run's files as artifacts: metrics.json, recipe.yaml and loss_curve.png when training ends, eval.json when
  ``qlora-kit eval`` runs on the run, export.json when ``qlora-kit export`` does, all in the same MLflow run
  (its id is kept in RUN_DIR/tracking.json);
- true paths after a move: MLflow's file store records absolute artifact locations in its meta.yaml files, and the
  run is trained in a staging folder that is renamed into place, so the store is pointed at the final folder before
  the rename, and at the run's current folder again whenever a later command logs to it (a run directory moved by
  hand keeps working).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from qlora_kit.errors import TrainingStopped
from qlora_kit.recipe import Recipe, training_args

STORE = "mlruns"
RECORD = "tracking.json"
TRAINING_ARTIFACTS = ("metrics.json", "recipe.yaml", "loss_curve.png")
# Every trackio release asks for pillow<13 (0.43 and later) or huggingface_hub<2 (0.5 to 0.42), or for a gradio that
# does (0.2 and earlier), and qlora-kit pins pillow 13 and huggingface_hub 2: no release installs beside them.
TRACKIO_BLOCKED = (
    "training.report_to: trackio is not installed, and no trackio release installs beside qlora-kit's pins (trackio "
    "0.43+ needs pillow<13, 0.5 to 0.42 need huggingface_hub<2, older ones an old gradio): use mlflow (pip install "
    "'qlora-kit[tracking]', a local store under the run directory) or tensorboard"
)


def reporters(recipe: Recipe) -> list[str]:
    report_to = training_args(recipe).get("report_to") or []
    return [report_to] if isinstance(report_to, str) else list(report_to)


def reports_to_mlflow(recipe: Recipe) -> bool:
    names = reporters(recipe)
    return "mlflow" in names or "all" in names


def store_uri(folder: Path) -> str:
    return (Path(os.path.abspath(folder)) / STORE).as_uri()


def _mlflow():
    # MLflow 3 refuses its file store unless asked for it by name; it is the store that needs no server or database.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    return mlflow


# ---------------------------------------------------------------------------------------------------------------
# During training


@dataclass
class TrackedRun:
    run_id: str
    local: bool


@contextmanager
def mlflow_run(recipe: Recipe, staging: Path, run_name: str | None, resume: bool, main: bool) -> Iterator:
    """The MLflow run transformers' MLflowCallback logs into (it logs into an active run rather than starting one).

    Yields a TrackedRun on the main process of a run that reports to mlflow, else None. A resumed run continues the
    MLflow run its staging folder recorded. A failure ends the run as FAILED, so the next run in the process starts
    clean.
    """
    if not (main and reports_to_mlflow(recipe)):
        yield None
        return
    mlflow = _mlflow()
    given = os.environ.get("MLFLOW_TRACKING_URI")
    local = not given
    # The callback logs through MLflow's process-wide tracking URI, which MLflow also copies into the environment;
    # both are put back afterwards, so a later run in this process still finds its own store.
    mlflow.set_tracking_uri(store_uri(staging) if local else given)
    previous = _recorded_run_id(staging) if resume else None
    if previous and local:
        repoint(staging / STORE, store_uri(staging))  # an unfinished run's folder may have been moved meanwhile
    run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=run_name)
    tracked = TrackedRun(run.info.run_id, local)
    (staging / RECORD).write_text(json.dumps({"mlflow": {"run_id": tracked.run_id, "local": local}}, indent=2) + "\n")
    try:
        yield tracked
    except BaseException as exc:
        # A run stopped by a signal saved a checkpoint and can be resumed into the same MLflow run.
        mlflow.end_run(status="KILLED" if isinstance(exc, TrainingStopped) else "FAILED")
        raise
    finally:
        mlflow.set_tracking_uri(given)


def finish_training(tracked: TrackedRun | None, staging: Path, run_dir: Path) -> None:
    """Log the run's files, end the MLflow run and point the store at ``run_dir``, where staging is about to go."""
    if tracked is None:
        return
    mlflow = _mlflow()
    files = [staging / name for name in TRAINING_ARTIFACTS if (staging / name).is_file()]
    _log_files(mlflow.MlflowClient(), tracked.run_id, files, None)
    mlflow.flush_async_logging()  # the callback logs metrics asynchronously
    mlflow.end_run()
    if tracked.local:
        repoint(staging / STORE, store_uri(run_dir))


# ---------------------------------------------------------------------------------------------------------------
# After training: eval and export log to the same run


def log_to_run(run_dir: Path, recipe: Recipe, files: Iterable[Path], artifact_path: str) -> str | None:
    """Log ``files`` as artifacts (under ``artifact_path``) of the MLflow run a finished run recorded.

    Returns the MLflow run id, or None when the run does not report to mlflow.
    """
    record = _recorded(run_dir)
    if record is None or not reports_to_mlflow(recipe):
        return None
    mlflow = _mlflow()
    if record["local"]:
        repoint(run_dir / STORE, store_uri(run_dir))
        client = mlflow.MlflowClient(tracking_uri=store_uri(run_dir))
    else:
        client = mlflow.MlflowClient()  # MLFLOW_TRACKING_URI, as when the run trained
    _log_files(client, record["run_id"], files, artifact_path)
    return record["run_id"]


def _log_files(client, run_id: str, files: Iterable[Path], artifact_path: str | None) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    # The repository from the run's meta.yaml as it is now: the client's own is cached per run id for the whole
    # process, and would still point at a staging folder since renamed (or the folder a copied run came from).
    repository = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
    for path in files:
        repository.log_artifact(str(path), artifact_path)


# ---------------------------------------------------------------------------------------------------------------
# The store's recorded paths


def repoint(store: Path, uri: str) -> int:
    """Make every local artifact location the file store at ``store`` records lie under ``uri``; returns how many
    changed. Experiments record ``<root>/<experiment id>``, runs ``<root>/<experiment id>/<run id>/artifacts``."""
    changed = 0
    for experiment in (p for p in store.iterdir() if p.is_dir() and p.name.isdigit()):
        changed += _rewrite(experiment / "meta.yaml", "artifact_location", f"{uri}/{experiment.name}")
        for run in (p for p in experiment.iterdir() if (p / "meta.yaml").is_file() and p.name != "models"):
            changed += _rewrite(run / "meta.yaml", "artifact_uri", f"{uri}/{experiment.name}/{run.name}/artifacts")
    return changed


def _rewrite(meta: Path, key: str, value: str) -> int:
    if not meta.is_file():
        return 0
    fields = yaml.safe_load(meta.read_text())
    # Only local locations move with the folder; one the user set elsewhere (a bucket, a server) is left alone.
    if not str(fields.get(key, "")).startswith("file:") or fields[key] == value:
        return 0
    fields[key] = value
    meta.write_text(yaml.safe_dump(fields, default_flow_style=False, sort_keys=False))
    return 1


def _recorded(folder: Path) -> dict | None:
    path = folder / RECORD
    return json.loads(path.read_text()).get("mlflow") if path.is_file() else None


def _recorded_run_id(folder: Path) -> str | None:
    record = _recorded(folder)
    return record["run_id"] if record else None
