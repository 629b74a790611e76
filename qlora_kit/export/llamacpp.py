"""Where llama.cpp is: its Python bindings (the compiled library) and its converter scripts, from the same source.

``make setup`` installs llama-cpp-python (built from source; the wheel is cached by pip) and extracts
convert_hf_to_gguf.py, convert_lora_to_gguf.py, their ``conversion`` package and ``gguf-py`` from the very same
llama-cpp-python source archive into ``.venv/share/llama.cpp``, so converter, quantizer and runtime agree.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from qlora_kit.errors import UserError

CONVERTER_ENV = "QLORA_KIT_LLAMA_CPP"
CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"
# llama.cpp's file types (enum llama_ftype in llama.h), read from the bindings by name.
FTYPE_NAMES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}


def converter_dir() -> Path:
    """The folder holding llama.cpp's converter scripts, ``conversion/`` and ``gguf-py/``."""
    folder = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "share" / "llama.cpp")
    missing = [name for name in (CONVERTER, LORA_CONVERTER, "conversion", "gguf-py") if not (folder / name).exists()]
    if missing:
        raise UserError(
            f"llama.cpp's converter is missing from {folder} ({', '.join(missing)}): run `make setup`, which "
            f"extracts it from the pinned llama-cpp-python source, or set {CONVERTER_ENV} to a llama.cpp checkout"
        )
    return folder


def bindings():
    """The llama_cpp module (llama-cpp-python), with a clear error when it is not installed."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserError(
            f"llama-cpp-python is not installed ({exc}): run `make setup` or pip install -c constraints.txt "
            "-e '.[gguf]' (it compiles llama.cpp once; pip caches the wheel)"
        ) from None
    return llama_cpp


def version() -> str:
    return getattr(bindings(), "__version__", "unknown")


def quantize(source: Path, target: Path, kind: str, threads: int) -> None:
    """Write ``target`` as GGUF type ``kind`` from the high-precision GGUF ``source`` with llama.cpp's quantizer."""
    llama_cpp = bindings()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPE_NAMES[kind])
    params.nthread = threads
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # one line per tensor from C; the report has what matters
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed writing {kind} ({target.name}): status {status}")


def load(path: Path, context: int, threads: int, lora: Path | None = None, vocab_only: bool = False):
    """A llama.cpp model with every position's logits kept (for perplexity), quiet, on the CPU threads given."""
    llama_cpp = bindings()
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=context,
        n_batch=context,
        n_ubatch=context,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        lora_path=str(lora) if lora else None,
        vocab_only=vocab_only,
        verbose=False,
    )
