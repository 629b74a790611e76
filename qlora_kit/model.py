"""4-bit base model and LoRA adapter, loaded the way the recipe says (safetensors-only by default).

The tokenizer rules (pad token, chat template, BOS, end-of-turn tokens) live in ``qlora_kit.tokenizer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qlora_kit.errors import UserError, first_line
from qlora_kit.recipe import Recipe
from qlora_kit.resolve import Resolved, resolve
from qlora_kit.tokenizer import check_model_path, pretrained_kwargs

# ---------------------------------------------------------------------------------------------------------------
# The model's config, checked before any weight loads


def read_model_config(recipe: Recipe):
    """The base model's config when it is on this machine (a local folder or the hub cache), else None."""
    from transformers import AutoConfig

    path = Path(recipe.model.name_or_path).expanduser()
    try:
        return AutoConfig.from_pretrained(recipe.model.name_or_path, **pretrained_kwargs(recipe))
    except (OSError, ValueError, KeyError) as exc:
        if path.is_dir():
            raise UserError(f"model.name_or_path: cannot read {path}/config.json: {first_line(exc)}") from None
        return None  # a hub id that is not cached: from_pretrained reports it when it loads


def model_config_problems(recipe: Recipe) -> list[str]:
    """What the model's config says cannot work: not a causal LM, a rank wider than the model, positions it lacks."""
    config = read_model_config(recipe)
    if config is None:
        return []
    problems = _causal_lm_problems(recipe, config)
    hidden = getattr(config, "hidden_size", None)
    if isinstance(hidden, int) and recipe.lora.r > hidden:
        problems.append(
            f"lora.r: {recipe.lora.r} is larger than the model's hidden size {hidden}, so the adapter would have "
            f"more parameters than the layers it adapts: use a rank below {hidden} (8 to 64 is usual)"
        )
    return problems + _position_problems(recipe, config)


def _causal_lm_problems(recipe: Recipe, config) -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = {name for name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() if isinstance(name, str)}
    architectures = list(getattr(config, "architectures", None) or [])
    decoder_only = not getattr(config, "is_encoder_decoder", False)
    if decoder_only and (not architectures or any(name in causal for name in architectures)):
        return []
    kind = ", ".join(architectures) or config.model_type
    return [
        f"model.name_or_path: {recipe.model.name_or_path} is a {kind}, not a causal (decoder-only) language model: "
        "qlora-kit fine-tunes text generators such as Llama, Qwen, Mistral, Gemma or Phi"
    ]


def _position_problems(recipe: Recipe, config) -> list[str]:
    """data.max_length beyond the positions the model was trained for: refused unless RoPE scaling extends them."""
    positions = getattr(config, "max_position_embeddings", None)
    length = recipe.data.max_length
    if not isinstance(positions, int) or length <= positions:
        return []
    if "max_length" not in recipe.data.model_fields_set:
        return []  # the schema's default is a cap, not a request; examples are rarely that long on such a model
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    scaling = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if scaling not in (None, "default"):
        import sys

        print(
            f"warning: data.max_length {length} is beyond the model's max_position_embeddings {positions}; its "
            f"{scaling} RoPE scaling extends positions, but quality past the trained length is not guaranteed",
            file=sys.stderr,
        )
        return []
    return [
        f"data.max_length: {length} is beyond the model's max_position_embeddings {positions} and its positions "
        f"cannot extend (no RoPE scaling): set data.max_length to {positions} or less"
    ]


# ---------------------------------------------------------------------------------------------------------------
# Base model


def quantization_config(recipe: Recipe, resolved: Resolved | None = None):
    """transformers' BitsAndBytesConfig for the recipe, or None for an unquantized base."""
    from transformers import BitsAndBytesConfig

    resolved = resolved or resolve(recipe)
    quant = recipe.quantization
    if quant.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not quant.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=resolved.compute_dtype,
        bnb_4bit_quant_storage=resolved.quant_storage,
    )


def load_base_model(recipe: Recipe, tokenizer=None, resolved: Resolved | None = None):
    """Load the pretrained causal LM quantized as the recipe says (4-bit NF4 by default)."""
    from transformers import AutoModelForCausalLM

    resolved = resolved or resolve(recipe)
    check_model_path(recipe)
    kwargs = dict(
        **pretrained_kwargs(recipe),
        quantization_config=quantization_config(recipe, resolved),
        dtype=resolved.weights_dtype,
        attn_implementation=resolved.attn_implementation,
        device_map=resolved.device_map,
        use_safetensors=None if recipe.model.allow_pickle else True,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, **kwargs)
    except LOAD_ERRORS as exc:
        raise weights_error("model.name_or_path", recipe.model.name_or_path, exc) from None
    if resolved.compute_dtype == torch.float32:
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


class _Float32(torch.nn.Module):
    """A parametrization that hands a layer its 16-bit weight as float32, computed each time the layer reads it."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float()


def repacked_for_cpu(model) -> bool:
    """Whether bitsandbytes re-packed any 4-bit layer for its bf16 CPU kernel (on a no-grad forward with bf16
    compute, see keep_float32_inference), rounding its quantization constants to bf16: those layers no longer hold
    the weights training computed with."""
    import bitsandbytes as bnb

    return any(_repacked(m) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def _repacked(layer) -> bool:
    return getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def _float32_forward_4bit(layer):
    """A 4-bit layer's forward in float32 on the weights it was trained against: dequantized into the dtype its
    quantization state records (bitsandbytes' CPU matmul would dequantize into the input's dtype instead, which is
    not what a bf16 run trained with nor what the merge writes), then upcast."""
    from bitsandbytes.functional import dequantize_4bit

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        bias = None if layer.bias is None else layer.bias.float()
        return torch.nn.functional.linear(x.float(), weight, bias)

    return forward


def compute_in_float32(model) -> int:
    """Make ``model`` compute in float32 while its weights stay stored as they are; return the layers changed.

    Merge verification compares two models that hold the same function up to rounding; computed in bf16, their
    rounding differences alone grow with depth (a loss difference of 0.004 at 16 layers of an 8B-family shape for a
    float32 merge, which is exact), enough to hide or mimic what the merge changed. Loading both in float32 would
    double the merged model's memory; instead every 16-bit weight is upcast when its layer reads it (torch's
    parametrizations: one float32 copy at a time), and each 4-bit layer dequantizes, as in training, then multiplies
    in float32. Activations stay float32 from the embeddings on.
    """
    import bitsandbytes as bnb
    from torch.nn.utils import parametrize

    changed = 0
    for module in list(model.modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            if _repacked(module):
                raise ValueError("compute_in_float32 needs 4-bit layers in bitsandbytes' standard layout")
            module.forward = _float32_forward_4bit(module)
            changed += 1
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype in (torch.bfloat16, torch.float16):
                parametrize.register_parametrization(module, name, _Float32(), unsafe=True)
                changed += 1
    return changed


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


def attach_lora(model, recipe: Recipe, resolved: Resolved | None = None):
    """Prepare a k-bit model for training and wrap it with fresh LoRA adapters."""
    from peft import get_peft_model

    model = prepare_for_training(model, recipe, resolved)
    check_target_modules(model, recipe.lora.target_modules)
    try:
        return get_peft_model(model, lora_config(recipe))
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {first_line(exc)}") from None


def prepare_for_training(model, recipe: Recipe, resolved: Resolved | None = None):
    """peft's k-bit preparation (input gradients, checkpointing), keeping frozen weights in bf16 under bf16 compute."""
    from peft import prepare_model_for_kbit_training

    resolved = resolved or resolve(recipe)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # The trainer enables checkpointing again with every option (every_n_layers, offload, selective); this only
        # has to agree with it on whether it is on (activation_checkpointing or its alias gradient_checkpointing).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=resolved.memory.checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": resolved.memory.use_reentrant},
        )
        if resolved.compute_dtype == torch.bfloat16:
            keep_frozen_weights_in_bf16(model)
    return model


def linear_module_names(model) -> list[str]:
    """The distinct last names of the model's linear layers (4-bit, 8-bit or plain), as target_modules uses them."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)}
    return sorted(names)


def _is_linear(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, torch.nn.Linear | bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def check_target_modules(model, target_modules: str | list[str]) -> None:
    """Every name in a target_modules list must match a module, or that part of the adapter silently never exists."""
    import difflib

    if isinstance(target_modules, str):
        return  # all-linear, or a regular expression that peft checks itself
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not missing:
        return
    linear = linear_module_names(model)
    close = {t: difflib.get_close_matches(t, linear, n=1, cutoff=0.6) for t in missing}
    hints = "".join(f" ('{t}': did you mean '{c[0]}'?)" for t, c in close.items() if c)
    raise UserError(
        f"lora.target_modules: {', '.join(map(repr, missing))} not found in this model{hints}; its linear modules "
        f"are {', '.join(linear)} (or use all-linear)"
    )


def load_adapter_model(
    recipe: Recipe, adapter_dir: str | Path, tokenizer=None, trainable: bool = False, resolved: Resolved | None = None
):
    """The 4-bit base with a saved adapter on top, exactly as it was trained."""
    from peft import PeftModel

    check_adapter_files(Path(adapter_dir))
    base = load_base_model(recipe, tokenizer, resolved)
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    except LOAD_ERRORS as exc:
        raise weights_error("adapter", adapter_dir, exc) from None


# ---------------------------------------------------------------------------------------------------------------
# Damaged or unsafe files: named, never a traceback


def _load_errors() -> tuple[type[BaseException], ...]:
    import pickle

    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError, pickle.UnpicklingError, EOFError)


LOAD_ERRORS = _load_errors()


def weights_error(key: str, where: str | Path, exc: BaseException) -> UserError:
    """The one-line error for a model or adapter that cannot be loaded, saying which file kind and what to do."""
    import pickle

    from safetensors import SafetensorError

    if isinstance(exc, pickle.UnpicklingError):
        return UserError(
            f"{key}: {where} holds a pickle checkpoint with Python objects other than plain tensors, which qlora-kit "
            "never runs: convert it to safetensors where you trust it, or use a safetensors checkpoint"
        )
    if isinstance(exc, SafetensorError | EOFError):
        return UserError(
            f"{key}: a .safetensors file in {where} is damaged or incomplete ({first_line(exc)}): download or copy "
            "it again"
        )
    hint = " (set model.allow_pickle: true only if you trust the file)" if "safetensors" in str(exc) else ""
    return UserError(f"{key}: cannot load {str(where)!r}: {first_line(exc)}{hint}")


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json as a mapping, or a UserError naming the file."""
    import json

    path = folder / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"adapter: {path} is missing: give a PEFT adapter folder (a run directory's adapter/)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"adapter: {path} is damaged ({exc}): copy the adapter again or train it again") from None
    if not isinstance(config, dict):
        raise UserError(f"adapter: {path} must hold a JSON object, not {type(config).__name__}")
    return config


def check_adapter_files(folder: Path) -> None:
    """An adapter folder has a readable config and weights whose safetensors header is whole."""
    from safetensors import SafetensorError, safe_open

    read_adapter_config(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            return
        raise UserError(f"adapter: {folder} has no adapter_model.safetensors: the adapter's weights are missing")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise UserError(f"adapter: {weights} is damaged or incomplete ({first_line(exc)}): copy it again") from None
