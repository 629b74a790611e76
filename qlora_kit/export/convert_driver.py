"""Runs llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) in a child process.

Usage: python convert_driver.py LLAMA_CPP_DIR SCRIPT PRE_TOKENIZER EOT_ID -- CONVERTER_ARGS...

Two things are added to the converter, nothing else is changed:
- PRE_TOKENIZER ("-" for none): the llama.cpp pre-tokenizer name to use when llama.cpp does not recognize the
  tokenizer's hash (a new or home-made BPE tokenizer). The caller proves the choice by tokenizing held-out text both
  ways; a recognized tokenizer keeps llama.cpp's own answer.
- EOT_ID ("-" for none): the chat template's end-of-turn token id, written as tokenizer.ggml.eot_token_id so that
  llama.cpp and Ollama stop at the end of an answer.
The tensors are written by llama.cpp's gguf package; this file only sets up its import path.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    folder, script, pre, eot = argv[:4]
    if argv[4] != "--":
        raise SystemExit("usage: convert_driver.py LLAMA_CPP_DIR SCRIPT PRE_TOKENIZER EOT_ID -- ARGS...")
    root = Path(folder)
    # llama.cpp's gguf-py from the same source as the converter comes first: the two change together.
    sys.path[:0] = [str(root / "gguf-py"), str(root)]
    from conversion import base

    if pre != "-":
        recognized = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return recognized(self, tokenizer)
            except NotImplementedError:
                return pre

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    if eot != "-":
        # Every text model's metadata passes through TextModel.prepare_metadata (subclasses call super()).
        prepare_metadata = base.TextModel.prepare_metadata

        def prepare_metadata_with_eot(self, vocab_only: bool) -> None:
            prepare_metadata(self, vocab_only)
            self.gguf_writer.add_eot_token_id(int(eot))

        base.TextModel.prepare_metadata = prepare_metadata_with_eot
    sys.argv = [str(root / script), *argv[5:]]
    runpy.run_path(str(root / script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
