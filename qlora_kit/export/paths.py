"""Where an export may go and how much disk it needs; the folder rules themselves are rundir's."""

from __future__ import annotations

import shutil
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.rundir import check_apart, check_new_output, check_writable

# Bytes per weight of each GGUF type: 16- and 32-bit floats, q8_0 (32 int8 + one f16 scale per block of 32),
# q5_k_m and q4_k_m (about 5.7 and 4.9 bits once the tensors llama.cpp keeps at higher precision are counted).
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_k_m": 5.7 / 8, "q4_k_m": 4.9 / 8}


def check_output(output: Path, inputs: list[Path], force: bool) -> None:
    """The output may never be, contain or lie inside an input (--force or not); an existing one needs --force."""
    check_apart(output, {f"the export's input {source}": source for source in inputs}, flag="--output")
    check_new_output(output, force, flag="--output")
    check_writable(output, flag="--output")


def check_disk_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(
            f"not enough disk space in {folder}: the export needs about {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB "
            "are free; free some space, export fewer export.types, or choose --output elsewhere"
        )
