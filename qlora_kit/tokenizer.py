"""Tokenizer rules: loading, a pad token that is not EOS, the chat template, BOS and end-of-turn tokens.

This is where the known tokenizer traps are closed: a pad token that is not EOS (so EOS stays in the loss and the
model learns to stop), a chat template for base models that have none, exactly one BOS, and the end-of-turn tokens
generation stops at. The data pipeline and the model loader both import these rules from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_kit.errors import UserError, first_line
from qlora_kit.recipe import Recipe

TEMPLATE_DIR = Path(__file__).parent / "templates"
DEFAULT_TEMPLATE = "chatml"


def check_model_path(recipe: Recipe) -> None:
    """A name that is clearly a path (./x, /x, ~/x, a/b/c) must exist; anything else may be a hub id."""
    for key, path in (
        ("model.name_or_path", recipe.model.name_or_path),
        ("model.tokenizer_name_or_path", recipe.model.tokenizer_name_or_path),
    ):
        if path is None or Path(path).expanduser().exists():
            continue
        if path.startswith((".", "/", "~")) or path.count("/") > 1:
            raise UserError(f"{key}: directory {path} does not exist: give a local folder or a hub id")


def pretrained_kwargs(recipe: Recipe) -> dict[str, Any]:
    return {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code}


def load_tokenizer(recipe: Recipe, saved: Path | None = None):
    """Load the tokenizer and make it safe to train with: distinct pad token and a chat template.

    ``saved`` is the folder a trained adapter was saved to: its tokenizer is the one training used (pad token and chat
    template byte for byte), so it is loaded as it is instead of applying the recipe's template again.
    """
    from transformers import AutoTokenizer

    if saved is None:
        check_model_path(recipe)
    source = str(saved) if saved is not None else recipe.model.tokenizer_name_or_path or recipe.model.name_or_path
    kwargs = {} if saved is not None else pretrained_kwargs(recipe)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        key = "adapter" if saved else "model.tokenizer_name_or_path" if recipe.model.tokenizer_name_or_path else ""
        key = key or "model.name_or_path"
        raise UserError(f"{key}: cannot load a tokenizer from {source!r}: {first_line(exc)}") from None
    if not tokenizer.is_fast:
        raise UserError(f"model.tokenizer_name_or_path: {source!r} has no fast tokenizer; qlora-kit needs one")
    ensure_pad_token(tokenizer)
    if saved is None:
        set_chat_template(tokenizer, recipe.model.chat_template)
    elif not tokenizer.chat_template:
        set_chat_template(tokenizer, None)
    return tokenizer


def ensure_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token that is not EOS; return what was done.

    With pad == EOS, collators that mask padding also mask the real EOS, and the model never learns to stop.
    Prefer an existing unused special token (unk, or a reserved/pad-named one) so the vocabulary does not grow.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return f"kept pad token {tokenizer.pad_token!r}"
    for candidate in _pad_candidates(tokenizer):
        if candidate not in (tokenizer.eos_token, tokenizer.bos_token):
            tokenizer.pad_token = candidate
            return f"pad token set to existing {candidate!r} (was {'EOS' if eos is not None else 'unset'})"
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return "added new pad token '<|pad|>' (embeddings are resized when the model loads)"


def _pad_candidates(tokenizer) -> list[str]:
    vocab_specials = [t for t in tokenizer.get_added_vocab() if "pad" in t.lower() or "reserved" in t.lower()]
    named = [tokenizer.unk_token] if tokenizer.unk_token else []
    return named + sorted(vocab_specials, key=lambda t: ("pad" not in t.lower(), t))


def check_pad_token(tokenizer) -> None:
    """Padding masked out of the loss must not be EOS, or the model never learns to stop (runs after the tokenizer
    loads, before the model does)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(
            f"pre-flight check: the pad token {tokenizer.pad_token!r} is the EOS token, so masking padding would mask "
            "every EOS: give the tokenizer a distinct pad token (model.tokenizer_name_or_path), or leave it unset "
            "and qlora-kit picks one"
        )


def set_chat_template(tokenizer, choice: str | None) -> str:
    """Install the recipe's chat template, or ChatML when the tokenizer has none; return where it came from."""
    if choice:
        tokenizer.chat_template = read_template(choice)
        return choice
    if tokenizer.chat_template:
        return "tokenizer"
    tokenizer.chat_template = read_template(DEFAULT_TEMPLATE)
    return f"{DEFAULT_TEMPLATE} (the tokenizer has none)"


def shipped_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def read_template(choice: str) -> str:
    """A shipped template by name, a .jinja file by path, or an inline Jinja string."""
    if (TEMPLATE_DIR / f"{choice}.jinja").is_file():
        return (TEMPLATE_DIR / f"{choice}.jinja").read_text()
    if choice.endswith((".jinja", ".j2")):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise UserError(f"model.chat_template: file {choice} does not exist")
        return path.read_text()
    if "{%" in choice or "{{" in choice:
        return choice
    names = ", ".join(shipped_templates())
    raise UserError(
        f"model.chat_template: unknown template {choice!r}: use one of {names}, or a path to a .jinja file"
    )


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end a generated answer: EOS plus the chat template's end-of-turn tokens when they exist."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()  # built anew on every call: fetch it once
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<｜end▁of▁sentence｜>"):
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    return ids


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own post-processor would put a BOS first (the model was pre-trained with one)."""
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id
