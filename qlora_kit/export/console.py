"""Terminal output of the export stage: one line per step, then the verification table."""

from __future__ import annotations

from typing import Any


class ExportProgress:
    def __init__(self, console) -> None:
        self.console = console

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        getattr(self, f"on_{event}", lambda _: None)(payload)

    def on_merge(self, info: dict[str, Any]) -> None:
        self.console.print(f"no merged model at {info['merged']}: merging first (verified)")

    def on_tokenizer(self, info: dict[str, Any]) -> None:
        self.console.print(
            f"tokenizer: pre-tokenizer {info['pre_tokenizer']}, same tokens as ours on {info['texts_checked']} texts"
        )

    def on_quantize(self, info: dict[str, Any]) -> None:
        self.console.print(f"writing {info['file']} ({info['type']}) with llama.cpp")

    def on_lora(self, info: dict[str, Any]) -> None:
        self.console.print(f"writing {info['file']} (GGUF LoRA) with llama.cpp")

    def on_verify(self, info: dict[str, Any]) -> None:
        self.console.print(f"verify: {info['step']}")

    def on_done(self, report: dict[str, Any]) -> None:
        from rich.markdown import Markdown

        from qlora_kit.export.report import markdown

        self.console.print(Markdown(markdown(report)))
        if report["complete"]:
            self.console.print(f"written: [bold]{report['output']}[/bold] (GGUF, Modelfile, export.json, export.md)")
