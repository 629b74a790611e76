"""Checkpoints that are complete or absent, exact resume, and a clean stop on SIGTERM/SIGINT.

transformers' Trainer writes ``checkpoint-N`` file by file in place, so a kill during a save leaves a folder that looks
like a checkpoint but lacks its optimizer or RNG state. qlora-kit has every rank write into a hidden folder, then the
main process writes a marker file last and renames the folder into place: a ``checkpoint-N`` with the marker is whole.
Resuming goes through Trainer's own ``resume_from_checkpoint``, which restores the adapter, optimizer, scheduler,
RNG states and the position in the data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from qlora_kit.errors import UserError

MARKER = "qlora-kit-checkpoint.json"
SAVING_DIR = ".saving"  # where checkpoints are written before they are renamed into place
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def complete_checkpoints(folder: Path) -> list[Path]:
    """The folder's complete checkpoints, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and is_complete(p)]
    return [path for _, path in sorted(found)]


def resume_checkpoint(staging: Path, resume: bool | str) -> Path:
    """The checkpoint to resume from: the latest complete one in the staging folder, or the one named."""
    if resume is True:
        found = complete_checkpoints(staging)
        if not found:
            raise UserError(
                f"--resume: no complete checkpoint in {staging} (the unfinished run's folder): start the "
                "run without --resume, or give --resume PATH to a checkpoint folder"
            )
        return found[-1]
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise UserError(f"--resume: {path} is not a folder: give a checkpoint-N folder, or --resume alone")
    if not is_complete(path):
        raise UserError(
            f"--resume: {path} is not a complete qlora-kit checkpoint (no {MARKER}, so its save was "
            "interrupted): give an earlier checkpoint, or --resume alone for the latest complete one"
        )
    return path


# ---------------------------------------------------------------------------------------------------------------
# Writing checkpoints atomically


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(tmp: Path, final: Path, step: int) -> None:
    """Write the marker last (flushed to disk), then rename the finished folder into place."""
    with open(tmp / MARKER, "w") as handle:
        json.dump({"step": step, "saved_at": time.time(), "files": sorted(p.name for p in tmp.iterdir())}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():  # an earlier save of the same step (resumed run saving again): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def remove_incomplete(folder: Path) -> list[str]:
    """Delete half-written saves left by a killed run; return their names."""
    removed = []
    for path in [folder / SAVING_DIR, *(p for p in folder.glob("checkpoint-*") if not is_complete(p))]:
        if path.exists():
            shutil.rmtree(path)
            removed.append(path.name)
    return removed


class AtomicCheckpoints:
    """Mixin for a Trainer: checkpoints go to ``<output_dir>/.saving/checkpoint-N`` and are renamed when whole."""

    _saving = False

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, SAVING_DIR) if self._saving else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._saving = True
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its part (RNG state, shards) into .saving
        finally:
            self._saving = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._point_best_checkpoint_at(run_dir)
            self.state.save_to_json(str(run_dir / SAVING_DIR / name / "trainer_state.json"))
            seal(run_dir / SAVING_DIR / name, run_dir / name, self.state.global_step)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint)
            if not any((run_dir / SAVING_DIR).iterdir()):
                (run_dir / SAVING_DIR).rmdir()
        self.accelerator.wait_for_everyone()

    def _point_best_checkpoint_at(self, run_dir: Path) -> None:
        """Trainer recorded the best checkpoint's path inside .saving; point it at where the folder will live."""
        best = self.state.best_global_step
        self.state.best_model_checkpoint = str(run_dir / f"checkpoint-{best}") if best else None


# ---------------------------------------------------------------------------------------------------------------
# Stopping on a signal


class StopOnSignal(TrainerCallback):
    """Once SIGTERM/SIGINT has arrived on any rank, save a checkpoint and end training."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.signum: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed_signal():
            control.should_save = True
            control.should_training_stop = True
        return control

    def _agreed_signal(self) -> int | None:
        # Every rank must stop at the same step or the others wait forever in the next all-reduce; the signal
        # may reach ranks at different moments, so they agree on the largest signal number seen (0 = none).
        accelerator = self.trainer.accelerator
        if accelerator.num_processes == 1:
            return self.signum
        import torch

        seen = torch.tensor([self.signum or 0], device=accelerator.device)
        self.signum = int(accelerator.reduce(seen, reduction="max").item()) or None
        return self.signum


@contextmanager
def signals_stop(callback, signums=(signal.SIGTERM, signal.SIGINT)):
    """While training, the first SIGTERM/SIGINT asks for a checkpoint and a stop; a second one acts as usual."""
    previous = {signum: signal.getsignal(signum) for signum in signums}

    def handler(signum, frame):
        callback.signum = signum
        signal.signal(signum, previous[signum])  # a second signal is not swallowed

    for signum in signums:
        signal.signal(signum, handler)
    try:
        yield callback
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
