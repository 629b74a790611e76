"""HF folder → GGUF through llama.cpp's own converters, run in a child process (see convert_driver.py).

The converter writes one high-precision GGUF (the merged model's own precision: f32, f16 or bf16); every requested
type is then made from it by llama.cpp's quantizer. A BPE tokenizer whose hash llama.cpp does not know gets the first
llama.cpp pre-tokenizer that tokenizes the held-out text exactly as the Hugging Face tokenizer does, or an error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.export import llamacpp

DRIVER = Path(__file__).with_name("convert_driver.py")
# Pre-tokenizers tried, in order, for a tokenizer llama.cpp does not recognize: digits split one by one before GPT-2's
# byte-level regex (the demo model's and SmolLM's), plain GPT-2, Qwen2's and Llama-3's.
PRE_TOKENIZERS = ("smollm", "gpt-2", "qwen2", "llama-bpe")
SOURCE_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# Text that tells pre-tokenizers apart: digit runs, spaces before digits and punctuation, contractions, newlines.
PROBE = "It's 2026: 3 + 33 = 36, isn't it?\n\n  Tabs\tand  spaces... (x=1); 'quoted' WORDS 12345 éà 🦙!"
UNRECOGNIZED = "pre-tokenizer was not recognized"


def run_converter(script: str, args: list[str], pre: str | None = None, eot: int | None = None) -> None:
    """Run one of llama.cpp's converter scripts; its log is shown only when it fails."""
    command = [sys.executable, str(DRIVER), str(llamacpp.converter_dir()), script, pre or "-"]
    command += [str(eot) if eot is not None else "-", "--", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise RuntimeError(f"llama.cpp's {script} failed (exit {done.returncode}):\n{tail}")


def convert_model(
    model_dir: Path, outfile: Path, outtype: str, pre: str | None, eot: int | None, vocab_only: bool = False
) -> None:
    args = [str(model_dir), "--outfile", str(outfile), "--outtype", outtype] + (["--vocab-only"] if vocab_only else [])
    run_converter(llamacpp.CONVERTER, args, pre, eot)


def convert_lora(adapter: Path, base_dir: Path, outfile: Path, outtype: str) -> None:
    """The PEFT adapter as a GGUF LoRA; ``base_dir`` gives the architecture (config.json) it applies to."""
    args = [str(adapter), "--base", str(base_dir), "--outfile", str(outfile), "--outtype", outtype]
    run_converter(llamacpp.LORA_CONVERTER, args)


def tokenizes_alike(vocab_gguf: Path, tokenizer, texts: list[str]) -> str | None:
    """None when llama.cpp tokenizes every text as ``tokenizer`` does, else the first text that differs."""
    model = llamacpp.load(vocab_gguf, context=64, threads=1, vocab_only=True)
    try:
        for text in texts:
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = model.tokenize(text.encode(), add_bos=False, special=True)
            if list(theirs) != list(ours):
                return text
        return None
    finally:
        model.close()


def choose_pre_tokenizer(model_dir: Path, scratch: Path, tokenizer, texts: list[str], wanted: str | None) -> dict:
    """The pre-tokenizer to write (None: llama.cpp's own choice) and the proof that it tokenizes like ours."""
    vocab = scratch / "vocab-check.gguf"
    texts = [PROBE, *texts]
    try:
        convert_model(model_dir, vocab, "f32", None, None, vocab_only=True)
        candidates: tuple[str | None, ...] = (None,)
    except RuntimeError as exc:
        if UNRECOGNIZED not in str(exc):
            raise
        candidates = (wanted,) if wanted else PRE_TOKENIZERS
    tried = {}
    for candidate in candidates:
        if candidate is not None:
            convert_model(model_dir, vocab, "f32", candidate, None, vocab_only=True)
        differs = tokenizes_alike(vocab, tokenizer, texts)
        vocab.unlink(missing_ok=True)
        if differs is None:
            return {"pre_tokenizer": candidate or "recognized by llama.cpp", "texts_checked": len(texts)}
        tried[candidate or "llama.cpp's own"] = differs
    detail = "; ".join(f"{name} differs on {text[:40]!r}" for name, text in tried.items())
    raise UserError(
        f"export.pre_tokenizer: llama.cpp does not tokenize like this model's tokenizer ({detail}): set "
        "export.pre_tokenizer to a llama.cpp pre-tokenizer name that matches"
    )
