"""``python -m qlora_kit.export.install DIR``: put llama.cpp's converter scripts in DIR (``make setup`` does this).

The llama-cpp-python wheel holds the compiled library but not llama.cpp's Python converters; its source archive holds
both, from the same llama.cpp commit. This downloads that archive for the installed version with pip (pip's cache
keeps it) and extracts convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/, gguf-py/ and the licence.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

WANTED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
VENDORED = "vendor/llama.cpp/"


def download_source(version: str, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    command += [f"llama-cpp-python=={version}", "-d", str(folder)]
    subprocess.run(command, check=True)
    return next(folder.glob("llama_cpp_python-*.tar.gz"))


def extract(archive: Path, target: Path) -> int:
    """Extract the converter files into a fresh ``target``; returns how many files were written."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    count = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            _, _, inside = member.name.partition(VENDORED)
            if member.isfile() and inside and inside.startswith(WANTED):
                member.name = inside
                tar.extract(member, staging, filter="data")
                count += 1
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return count


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else Path(sys.prefix) / "share" / "llama.cpp")
    version = metadata.version("llama-cpp-python")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        count = extract(download_source(version, Path(folder)), target)
    print(f"llama.cpp {version} converter: {count} files in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
