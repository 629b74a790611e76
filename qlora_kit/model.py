"""4-bit base model and LoRA adapter, loaded the way the recipe says (safetensors-only by default).

The tokenizer rules (pad token, chat template, BOS, end-of-turn tokens) live in ``qlora_kit.tokenizer``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from qlora_kit.errors import UserError
from qlora_kit.recipe import Recipe
from qlora_kit.tokenizer import check_model_path, pretrained_kwargs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


def compute_dtype(recipe: Recipe) -> torch.dtype:
    """The matmul dtype: the recipe's, or bf16 on a GPU that has it and float32 elsewhere (never fp16 silently)."""
    name = recipe.quantization.bnb_4bit_compute_dtype
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def attention_kernel(recipe: Recipe) -> str:
    """The recipe's attention kernel; for auto, flash-attention 2 where it runs (an Ampere or newer GPU, the
    flash-attn package, 16-bit compute: it reads packed sequence boundaries itself), else PyTorch's sdpa."""
    requested = recipe.model.attn_implementation
    if requested != "auto":
        return requested
    flash_runs = (
        torch.cuda.is_available()
        and compute_dtype(recipe) in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.get_device_capability()[0] >= 8
    )
    return "flash_attention_2" if flash_runs else "sdpa"


def weights_dtype(recipe: Recipe) -> torch.dtype:
    """dtype of the parameters that stay unquantized (embeddings, norms, LoRA)."""
    return compute_dtype(recipe) if recipe.model.dtype == "auto" else DTYPES[recipe.model.dtype]


# ---------------------------------------------------------------------------------------------------------------
# Base model


def quantization_config(recipe: Recipe):
    """transformers' BitsAndBytesConfig for the recipe, or None for an unquantized base."""
    from transformers import BitsAndBytesConfig

    quant = recipe.quantization
    if quant.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not quant.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(recipe),
        bnb_4bit_quant_storage=DTYPES[quant.bnb_4bit_quant_storage],
    )


def device_map(recipe: Recipe) -> dict[str, Any] | str | None:
    """Each process loads its whole model onto its own device, unless FSDP/ZeRO-3 shard it (see launch.py)."""
    from qlora_kit.launch import device_map_for

    return device_map_for(recipe)


def load_base_model(recipe: Recipe, tokenizer=None):
    """Load the pretrained causal LM quantized as the recipe says (4-bit NF4 by default)."""
    from transformers import AutoModelForCausalLM

    check_model_path(recipe)
    kwargs = dict(
        **pretrained_kwargs(recipe),
        quantization_config=quantization_config(recipe),
        dtype=weights_dtype(recipe),
        attn_implementation=attention_kernel(recipe),
        device_map=device_map(recipe),
        use_safetensors=None if recipe.model.allow_pickle else True,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        hint = " (set model.allow_pickle: true only if you trust the file)" if "safetensors" in str(exc) else ""
        raise UserError(
            f"model.name_or_path: cannot load {recipe.model.name_or_path!r}: {_first_line(exc)}{hint}"
        ) from None
    if compute_dtype(recipe) == torch.float32:
        keep_float32_inference(model)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def keep_float32_inference(model) -> int:
    """Stop bitsandbytes from switching 4-bit layers to its bf16 CPU kernel at inference time; return the count.

    On CPUs with AVX512-BF16, Linear4bit re-packs its weight on the first no-grad forward and rounds the quantization
    constants to bf16, so evaluation would silently run in bf16 (and a later state_dict would differ from the loaded
    base) even though the recipe asked for float32. qlora-kit keeps inference numerically identical to training.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def keep_frozen_weights_in_bf16(model) -> int:
    """Undo prepare_model_for_kbit_training's fp32 upcast of the unquantized weights under bf16 compute; return the
    number of tensors cast.

    peft upcasts embeddings, lm_head and norms to fp32 for fp16's narrow range. bf16 has fp32's range, these weights
    are frozen, and the upcast doubles them: 2 x 128,256 x 4,096 x 2 B = 2.1 GB more on Llama-3.1-8B, which a plain
    trl script (no upcast) does not pay. This restores the dtypes the model was loaded in.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32]
    for param in frozen:
        param.data = param.data.to(torch.bfloat16)
    return len(frozen)


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def attach_lora(model, recipe: Recipe):
    """Prepare a k-bit model for training and wrap it with fresh LoRA adapters."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        gradient_checkpointing = bool(recipe.training.get("gradient_checkpointing", True))
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if compute_dtype(recipe) == torch.bfloat16:
            keep_frozen_weights_in_bf16(model)
    try:
        return get_peft_model(model, lora_config(recipe))
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {_first_line(exc)}") from None


def load_adapter_model(recipe: Recipe, adapter_dir: str | Path, tokenizer=None, trainable: bool = False):
    """The 4-bit base with a saved adapter on top, exactly as it was trained."""
    from peft import PeftModel

    base = load_base_model(recipe, tokenizer)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
