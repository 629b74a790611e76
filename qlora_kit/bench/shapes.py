"""Random-weight models built from a shipped architecture config (`arch:NAME`), cached, for benchmarks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from qlora_kit.errors import UserError
from qlora_kit.plan import ARCH_PREFIX, arch_config
from qlora_kit.rundir import fresh_staging, publish


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit")) / "random-models"


def materialize_architecture(recipe) -> Path | None:
    """For ``model.name_or_path: arch:NAME[,key=value]``, save a random-weight model of that shape and point the
    recipe at it (cached by config and tokenizer, so both benchmark sides and later runs reuse it).

    The tokenizer comes from ``model.tokenizer_name_or_path``; the model keeps the architecture's own vocabulary size
    (a larger embedding than the tokenizer needs costs the same memory as the real model's).
    """
    spec = recipe.model.name_or_path
    if not spec.startswith(ARCH_PREFIX):
        return None
    if not recipe.model.tokenizer_name_or_path:
        raise UserError(
            f"model.tokenizer_name_or_path: {spec} has random weights and no tokenizer: name one "
            "(any local tokenizer folder, e.g. models/demo-base)"
        )
    config = arch_config(spec)
    key = hashlib.sha256(
        json.dumps([config, recipe.model.tokenizer_name_or_path], sort_keys=True).encode()
    ).hexdigest()
    target = cache_root() / f"{spec.removeprefix(ARCH_PREFIX).split(',')[0]}-{key[:12]}"
    if not (target / "config.json").is_file():
        _save_random_model(config, recipe.model.tokenizer_name_or_path, target)
    recipe.model.name_or_path = str(target)
    return target


def _save_random_model(config: dict[str, Any], tokenizer_path: str, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    if len(tokenizer) > hf_config.vocab_size:
        hf_config.vocab_size = len(tokenizer)
    # The random model is used with this tokenizer, so its special tokens are the ones that matter.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(hf_config, name, getattr(tokenizer, name))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    staging = fresh_staging(target)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    publish(staging, target)
