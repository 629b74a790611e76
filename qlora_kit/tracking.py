"""Experiment tracking beyond TensorBoard: MLflow and trackio, offline, with the run's files as artifacts.

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

transformers' TrackioCallback (``training.report_to: trackio``) logs the trainer's arguments and every logged loss
into trackio's own local store (``TRACKIO_DIR``, by default ``HF_HOME/trackio``; ``trackio show`` opens it), local
only unless the recipe names a ``trackio_space_id``. This module adds:

- a run name that survives ``--resume``: the callback opens its run by name (``resume="allow"``), so a run without
  ``training.run_name`` is given one (the run folder's name and the start time) and a resumed run reuses it, where
  the callback alone would start a second, unnamed run;
- the same files as artifacts of that trackio run: metrics.json, recipe.yaml and loss_curve.png after training,
  eval.json and export.json later (trackio's project, run name and store are kept in RUN_DIR/tracking.json).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
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


def reporters(recipe: Recipe) -> list[str]:
    report_to = training_args(recipe).get("report_to") or []
    return [report_to] if isinstance(report_to, str) else list(report_to)


def reports_to_mlflow(recipe: Recipe) -> bool:
    names = reporters(recipe)
    return "mlflow" in names or "all" in names


def reports_to_trackio(recipe: Recipe) -> bool:
    names = reporters(recipe)
    return "trackio" in names or "all" in names


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
def tracked_run(recipe: Recipe, args, staging: Path, run_dir: Path, resume: bool, main: bool) -> Iterator:
    """What the trackers need before training starts: trackio's run name, set on the trainer's arguments (its
    callback reads them when training begins), and the MLflow run its callback logs into (see ``mlflow_run``)."""
    name_trackio_run(recipe, args, staging, run_dir, resume, main)
    with mlflow_run(recipe, staging, args.run_name, resume, main) as tracked:
        yield tracked


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
    _record(staging, "mlflow", {"run_id": tracked.run_id, "local": local})
    try:
        yield tracked
    except BaseException as exc:
        # A run stopped by a signal saved a checkpoint and can be resumed into the same MLflow run.
        mlflow.end_run(status="KILLED" if isinstance(exc, TrainingStopped) else "FAILED")
        raise
    finally:
        mlflow.set_tracking_uri(given)


def finish_training(tracked: TrackedRun | None, staging: Path, run_dir: Path) -> None:
    """Log the run's files to its trackers; end the MLflow run and point its store at ``run_dir``, where staging is
    about to go."""
    files = [staging / name for name in TRAINING_ARTIFACTS if (staging / name).is_file()]
    if trackio_record := _records(staging).get("trackio"):
        _log_trackio_files(trackio_record, files, "training")
    if tracked is None:
        return
    mlflow = _mlflow()
    _log_files(mlflow.MlflowClient(), tracked.run_id, files, None)
    mlflow.flush_async_logging()  # the callback logs metrics asynchronously
    mlflow.end_run()
    if tracked.local:
        repoint(staging / STORE, store_uri(run_dir))


# ---------------------------------------------------------------------------------------------------------------
# trackio: the callback logs the metrics; the run needs a name that survives --resume, and the run's files


def name_trackio_run(recipe: Recipe, config, staging: Path, run_dir: Path, resume: bool, main: bool) -> None:
    """Set ``config.run_name`` to the trackio run this training logs into, and record it in the staging folder.

    A resumed run reuses the name its first attempt recorded; a new one keeps the recipe's ``run_name`` or gets the
    run folder's name and the start time (two trainings of one folder are two trackio runs, as they are in MLflow).
    """
    if not reports_to_trackio(recipe):
        return
    recorded = _records(staging).get("trackio") if resume else None
    if recorded:
        config.run_name = recorded["run"]
    elif not config.run_name:
        config.run_name = f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if main:
        _record(
            staging,
            "trackio",
            {
                "project": config.project,
                "run": config.run_name,
                "store": str(trackio_store()),
                "space_id": config.trackio_space_id,
            },
        )


def trackio_store() -> Path:
    """Where trackio keeps its local runs: TRACKIO_DIR, else HF_HOME/trackio (trackio's own rule)."""
    from trackio.utils import TRACKIO_DIR

    return Path(TRACKIO_DIR)


def _log_trackio_files(record: dict, files: Iterable[Path], kind: str) -> None:
    """Log each file as a trackio artifact of the recorded run (trackio names it ``run-<run id>-<file name>``;
    ``kind`` is its type: training, eval or export)."""
    import trackio

    # trackio announces every init and finish on stdout; the command's own output says what was logged where.
    with contextlib.redirect_stdout(io.StringIO()):
        trackio.init(
            project=record["project"],
            name=record["run"],
            space_id=record.get("space_id"),
            resume="must",
            auto_log_cpu=False,
            auto_log_gpu=False,
        )
        try:
            for path in files:
                trackio.log_artifact(path, type=kind)
        finally:
            trackio.finish()


# ---------------------------------------------------------------------------------------------------------------
# After training: eval and export log to the same run


def log_to_run(run_dir: Path, recipe: Recipe, files: Iterable[Path], artifact_path: str) -> str | None:
    """Log ``files`` as artifacts (under ``artifact_path``) of the MLflow run a finished run recorded.

    Also logs them to the run's trackio run, when it reported to one. Returns the MLflow run id, or None when the
    run does not report to mlflow.
    """
    files = list(files)
    if (trackio_record := _records(run_dir).get("trackio")) and reports_to_trackio(recipe):
        _log_trackio_files(trackio_record, files, artifact_path)
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


def _records(folder: Path) -> dict:
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(folder: Path, tracker: str, fields: dict) -> None:
    """Keep ``fields`` for ``tracker`` in the run's tracking.json, beside what the other trackers recorded."""
    records = {**_records(folder), tracker: fields}
    (folder / RECORD).write_text(json.dumps(records, indent=2) + "\n")


def _recorded(folder: Path) -> dict | None:
    return _records(folder).get("mlflow")


def _recorded_run_id(folder: Path) -> str | None:
    record = _recorded(folder)
    return record["run_id"] if record else None
