"""Where an export may go, how much disk it needs, and the one place that imports the run-directory helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.train import peak_memory_bytes, publish, staging_dir_for, versions

# Bytes per weight of each GGUF type: 16- and 32-bit floats, q8_0 (32 int8 + one f16 scale per block of 32),
# q5_k_m and q4_k_m (about 5.7 and 4.9 bits once the tensors llama.cpp keeps at higher precision are counted).
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_k_m": 5.7 / 8, "q4_k_m": 4.9 / 8}

__all__ = ["BYTES_PER_WEIGHT", "check_disk_space", "check_output", "peak_memory_bytes", "publish", "staging_for"]
__all__ += ["versions"]


def staging_for(output: Path) -> Path:
    return staging_dir_for(output)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(output: Path, inputs: list[Path], force: bool) -> None:
    """The output may never be, contain or lie inside an input (--force or not); an existing one needs --force."""
    target = output.resolve()
    for source in inputs:
        source = source.resolve()
        if _inside(target, source) or _inside(source, target):
            raise UserError(
                f"export output {output} overlaps the export's input {source}: replacing it would destroy what it is "
                "made from; choose --output outside it (default RUN_DIR/gguf)"
            )
    if output.exists() and not force:
        raise UserError(f"output directory {output} already exists: pass --force to replace it, or choose --output")


def check_disk_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(
            f"not enough disk space in {folder}: the export needs about {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB "
            "are free; free some space, export fewer export.types, or choose --output elsewhere"
        )
