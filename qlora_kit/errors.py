"""The exception types the CLI knows: ``UserError`` (the user can fix it: exit 2) and ``TrainingStopped``."""

from __future__ import annotations

import signal
from pathlib import Path


class UserError(Exception):
    """A mistake in a recipe, a command line or an input file.

    The message is shown as a single ``error:`` line, so it names the key, file or row and says what to do.
    """


class TrainingStopped(Exception):
    """Training stopped on a signal after saving a checkpoint; the run can be resumed."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved at {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"stopped by {name} at step {step}; {where}: continue with the same command and --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by signal N": 143 for SIGTERM, 130 for SIGINT


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library messages often run to a page), or its type's name."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
