"""``python -m qlora_kit.export.chat FILE.gguf [MESSAGE] [--lora LORA.gguf]``: chat with an exported GGUF in llama.cpp.

The prompt is rendered by llama.cpp's chat mode from the GGUF's own chat template (llama-cpp-python's
create_chat_completion), greedy, and stops at the end-of-turn token in the GGUF's metadata: exactly what another
llama.cpp front end does with the file. With a MESSAGE it answers once; without, it reads one message per line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.export import llamacpp


def answer(model, history: list[dict], max_tokens: int) -> str:
    reply = model.create_chat_completion(messages=history, temperature=0.0, max_tokens=max_tokens)
    return reply["choices"][0]["message"]["content"].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_kit.export.chat", description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="an exported .gguf file")
    parser.add_argument("message", nargs="?", help="one user message (default: read messages from stdin)")
    parser.add_argument("--lora", help="a GGUF LoRA to apply (from export --adapter-only)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    args = parser.parse_args(argv)
    try:
        if not Path(args.gguf).is_file():
            raise UserError(f"{args.gguf} does not exist: run `qlora-kit export RUN_DIR` first")
        llama_cpp = llamacpp.bindings()
        model = llama_cpp.Llama(
            model_path=args.gguf, lora_path=args.lora, n_ctx=512, n_threads=os.cpu_count(), verbose=False
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    history = [{"role": "system", "content": args.system}] if args.system else []
    for line in [args.message] if args.message else sys.stdin:
        history.append({"role": "user", "content": line.strip()})
        reply = answer(model, history, args.max_tokens)
        history.append({"role": "assistant", "content": reply})
        print(f"user: {line.strip()}\nassistant: {reply}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
