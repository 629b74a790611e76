"""The base model as the run loaded it: where its checkpoint is, which weights bitsandbytes quantized, and how.

transformers 5 loads a 4-bit model by casting each checkpoint tensor to the ``dtype`` passed to ``from_pretrained``
and then calling ``bitsandbytes.functional.quantize_4bit`` on it (``Params4bit._quantize``: blocksize 64, the recipe's
quant type, double quant and storage dtype), on the device the layer is placed on. Linear4bit dequantizes that packed
weight in every forward. So ``dequantize_4bit(quantize_4bit(w.to(dtype)))`` on the same kind of device is, bit for
bit, the weight the adapter was trained against; which layers were quantized is read from transformers' own
quantizer, applied to an empty (meta-device) copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit import model as model_stage
from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.errors import UserError, first_line
from qlora_kit.recipe import Recipe
from qlora_kit.resolve import DTYPES, resolve


def locate_checkpoint(recipe: Recipe) -> Path:
    """The local folder of the base checkpoint: the recipe's path, or its hub snapshot (downloaded if needed)."""
    name = recipe.model.name_or_path
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    tokenizer_rules.check_model_path(recipe)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(name, revision=recipe.model.revision, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated: all mean the base cannot be had here
        raise UserError(
            f"model.name_or_path: cannot get the base checkpoint {name!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "give a local folder with model.name_or_path=PATH"
        ) from None


def load_config(folder: Path, recipe: Recipe):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"base model {folder}: cannot read its config.json: {first_line(exc)}") from None
    if getattr(config, "quantization_config", None):
        raise UserError(f"base model {folder} is stored quantized: merge needs a full-precision base checkpoint")
    return config


@dataclass
class BaseLayout:
    """What the empty model says about the base: shapes, quantized weights, embeddings and tied weights."""

    shapes: dict[str, tuple[int, ...]]
    quantized: set[str]
    input_embedding: str
    output_embedding: str | None
    tied: dict[str, str]  # tied weight -> the weight it shares


def base_layout(config, recipe: Recipe) -> BaseLayout:
    """Build the model on the meta device, then let transformers' bitsandbytes quantizer swap in its 4-bit layers."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        except ValueError as exc:
            raise UserError(f"base model: not a causal LM transformers can build: {first_line(exc)}") from None
    names = {id(module): name for name, module in model.named_modules()}
    shapes = {key: tuple(value.shape) for key, value in model.state_dict(keep_vars=True).items()}
    input_embedding = names[id(model.get_input_embeddings())] + ".weight"
    output = model.get_output_embeddings()
    output_embedding = names[id(output)] + ".weight" if output is not None else None
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    _check_supported(model)
    quantized: set[str] = set()
    qconfig = model_stage.quantization_config(recipe)
    if recipe.quantization.load_in_4bit and qconfig is not None:
        import bitsandbytes as bnb
        from transformers.quantizers.auto import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)
        quantizer.preprocess_model(
            model=model,
            dtype=resolve(recipe).weights_dtype,
            device_map={"": "cpu"},
            checkpoint_files=None,
            use_kernels=False,
        )
        quantized = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return BaseLayout(shapes, quantized, input_embedding, output_embedding, tied)


def _check_supported(model) -> None:
    from transformers.pytorch_utils import Conv1D

    if any(isinstance(module, Conv1D) for module in model.modules()):
        raise UserError(
            f"base model {type(model).__name__} uses Conv1D layers (GPT-2 style), which merge does not handle"
        )


def merge_device() -> torch.device:
    """A GPU when there is one (as training used it), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def roundtrip_4bit(weight: torch.Tensor, recipe: Recipe, device: torch.device) -> torch.Tensor:
    """The weight as the 4-bit base holds it: cast to the load dtype, quantized and dequantized by bitsandbytes."""
    from bitsandbytes import functional

    quant = recipe.quantization
    value = weight.to(device=device, dtype=resolve(recipe).weights_dtype).contiguous()
    packed, state = functional.quantize_4bit(
        value,
        blocksize=64,  # Params4bit's default, which transformers' loader keeps
        compress_statistics=quant.bnb_4bit_use_double_quant,
        quant_type=quant.bnb_4bit_quant_type,
        quant_storage=DTYPES[quant.bnb_4bit_quant_storage],
    )
    return functional.dequantize_4bit(packed, state)
