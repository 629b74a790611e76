"""The Ollama Modelfile written beside the GGUF: FROM, the chat template in Ollama's Go syntax, stops, system prompt.

Ollama renders prompts with Go templates, not Jinja, so each chat format qlora-kit ships (qlora_kit/templates) has
its translation here; the family is recognized from the model's Jinja template. Ollama adds the BOS token itself
when the GGUF asks for one, so no template below writes it. For a template of another family no TEMPLATE is written
and Ollama falls back to its own detection from the GGUF's tokenizer.chat_template (the export report says so).
"""

from __future__ import annotations

from pathlib import Path

from qlora_kit.tokenizer import end_of_turn_ids

CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
QWEN = (
    """{{- if not .System }}<|im_start|>system
You are a helpful assistant.<|im_end|>
{{ end }}"""
    + CHATML
)
LLAMA_3 = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""
# Mistral and Gemma have no system role: the system prompt goes in front of the first user message, as in Jinja.
SYSTEM_FIRST = (
    '{{- $system := "" }}{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
)
FIRST_USER_PREFIX = "{{ if $first }}{{ if $system }}{{ $system }}\n\n{{ end }}{{ $first = false }}{{ end }}"
MISTRAL = (
    SYSTEM_FIRST
    + "{{- $first := true }}{{- range .Messages }}"
    + '{{- if eq .Role "user" }}[INST] '
    + FIRST_USER_PREFIX
    + "{{ .Content }} [/INST]"
    + '{{- else if eq .Role "assistant" }} {{ .Content }}</s>{{- end }}{{- end }}'
)
GEMMA = (
    SYSTEM_FIRST
    + "{{- $first := true }}{{- range .Messages }}"
    + '{{- if ne .Role "system" }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
    + FIRST_USER_PREFIX
    + "{{ .Content }}<end_of_turn>\n{{ end }}{{- end }}<start_of_turn>model\n"
)
PHI_3 = """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""
TEMPLATES = {"chatml": CHATML, "qwen": QWEN, "llama-3": LLAMA_3, "mistral": MISTRAL, "gemma": GEMMA, "phi-3": PHI_3}
# How each family's Jinja template shows itself, most specific first (qwen is ChatML with a default system prompt).
MARKERS = (
    ("qwen", ("<|im_start|>", "You are a helpful assistant.")),
    ("chatml", ("<|im_start|>",)),
    ("llama-3", ("<|start_header_id|>",)),
    ("gemma", ("<start_of_turn>",)),
    ("phi-3", ("<|end|>", "<|assistant|>")),
    ("mistral", ("[INST]",)),
)


def family(chat_template: str | None) -> str | None:
    """The shipped chat format a Jinja template belongs to, or None."""
    if not chat_template:
        return None
    for name, markers in MARKERS:
        if all(marker in chat_template for marker in markers):
            return name
    return None


def stop_tokens(tokenizer) -> list[str]:
    """The text of every token that ends an answer (EOS and the template's end-of-turn tokens)."""
    return [tokenizer.convert_ids_to_tokens(token) for token in end_of_turn_ids(tokenizer)]


def modelfile(
    gguf_name: str, tokenizer, system_prompt: str | None, adapter: str | None = None
) -> tuple[str, str | None]:
    """The Modelfile's text and the chat family whose template it carries (None: Ollama's own detection)."""
    name = family(tokenizer.chat_template)
    lines = [f"FROM ./{gguf_name}"] + ([f"ADAPTER ./{adapter}"] if adapter else []) + [""]
    if name is not None:
        lines += [f'TEMPLATE """{TEMPLATES[name]}"""', ""]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(tokenizer)]
    if system_prompt:
        lines += ["", f'SYSTEM """{system_prompt}"""']
    return "\n".join(lines) + "\n", name


def write_modelfile(
    folder: Path, gguf_name: str, tokenizer, system_prompt: str | None, adapter: str | None = None
) -> str | None:
    text, name = modelfile(gguf_name, tokenizer, system_prompt, adapter)
    (folder / "Modelfile").write_text(text)
    return name
