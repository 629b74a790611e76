"""Memory planner: predict a recipe's peak training memory from the model's config alone, before loading anything.

Every term is a closed-form count, written out so the arithmetic can be checked by hand (``tests/test_plan.py`` does).
Worked example, Llama-3.1-8B, QLoRA r=16 on all linear layers, batch 1 x 2048 tokens, bf16 compute, paged 8-bit
AdamW (the numbers are checked against the planner by tests/test_docs.py):

    quantized_weights    6.98e9 params x (4 bits + 0.127 bits of constants) / 8      = 3.60 GB
    unquantized_weights  embeddings + lm_head 2 x 128256 x 4096 = 1.05e9 params x 2 bytes
                         (bf16: qlora-kit undoes peft's fp32 upcast)                   = 2.10 GB
    lora_weights         32 layers x r 16 x sum(in + out) = 41.9e6 params x 2 bytes    = 0.08 GB
    gradients            41.9e6 x 2 bytes                                              = 0.08 GB
    optimizer_states     41.9e6 x 2 states x 1 byte (8-bit) + block constants         = 0.09 GB
    activations          2048 x (32 layers x 4096 x 2 bytes kept at checkpoints
                         + 350,432 bytes for the one layer being recomputed)           = 1.26 GB
    logits               trl's chunked loss: 2048 x (4096 x (2 kept + 4 fp32 gradient) + 48 bytes of
                         statistics) + one 2048 x 32768 bf16 tile of the logits        = 0.18 GB
    total                                                                              = 7.39 GB (6.89 GiB)

With the full logits (label_smoothing_factor > 0 makes trl build them) the last line would be 2048 x 128256 x
(2 bf16 + 4 fp32 copy + 4 fp32 gradient), 2.63 GB. `qlora-kit plan --memory 24GiB` turns the same arithmetic
around: the longest data.max_length that fits, with and without each memory switch (activation checkpointing and its
every_n_layers, offload and selective options, trl's activation offloading, Liger's kernels).

Sources: QLoRA (Dettmers et al. 2023, section 3) for NF4 with 64-element blocks and double quantization (0.127 instead
of 0.5 bits per parameter of constants); Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4.1) for counting the activations a transformer layer saves for backward, adapted here to
Llama-style layers (RMSNorm, grouped-query attention, SwiGLU MLP, fused attention that keeps no s x s scores); trl's
trl/kernels/chunked_logprob.py for the loss, which projects the LM head one tile at a time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.errors import UserError
from qlora_kit.resolve import Launch, Machine, dtype_name, resolve, this_machine

ARCH_DIR = Path(__file__).parent / "architectures"
ARCH_PREFIX = "arch:"
GIB = 2**30

# bitsandbytes 4-bit layout (bitsandbytes.functional.quantize_4bit): two 4-bit codes per byte, one absmax per block of
# 64 weights; with double quantization the absmax values are themselves quantized to 8 bits in blocks of 256, each
# block keeping one fp32 absmax, plus one fp32 offset per tensor.
NF4_BLOCK = 64
DQ_BLOCK = 256
NF4_CODE_BYTES = 16 * 4  # the 16-entry NF4 code book, fp32, stored with every layer's quant state
DQ_CODE_BYTES = 256 * 4  # the 8-bit dynamic code book of the second level, fp32, one copy per layer once loaded

# bitsandbytes 8-bit optimizers keep 8-bit states only for tensors of at least this many elements (min_8bit_size),
# in blocks of 256 with one fp32 absmax per block and state; smaller tensors get fp32 states.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPT_BLOCK = 256

LORA_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Hub names that differ from the shipped file name only by a suffix that does not change the shape.
SHAPE_SUFFIXES = re.compile(r"-(instruct|chat|it|hf|base)(?=-|$)")
ALIASES = {
    "mistral-7b-v0.3": "mistral-7b",
    "mistral-7b-v0.1": "mistral-7b",  # v0.1's 32,000-token vocabulary: 6.3M parameters fewer than the shipped v0.3
    "meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama-3.1-70b": "llama-3.1-70b",
}


# ---------------------------------------------------------------------------------------------------------------
# Model shape


@dataclass
class Shape:
    """The dimensions of a Llama-style decoder that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    fused: bool = False  # Phi-3: one qkv_proj and one gate_up_proj instead of q/k/v and gate/up
    name: str = "model"

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model") -> Shape:
        config = config.get("text_config", config)
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 hard-codes biases on q, k and v; Llama exposes them as attention_bias.
            qkv_bias=bool(config.get("attention_bias", False)) or config.get("model_type") == "qwen2",
            fused=config.get("model_type") == "phi3",
            name=name,
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Weights of every decoder-layer linear (the part bitsandbytes quantizes), all layers."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> dict[str, int]:
        """Parameters that stay unquantized: embeddings, lm_head (bitsandbytes skips it), norms, biases."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "embed_tokens": self.vocab * self.hidden,
            "lm_head": 0 if self.tied else self.vocab * self.hidden,
            "norms": (2 * self.layers + 1) * self.hidden,  # two RMSNorms per layer and the final one
            "biases": self.layers * (q + 2 * kv) if self.qkv_bias else 0,
        }

    def total_params(self) -> int:
        return self.linear_params() + sum(self.other_params().values())


def read_config(name_or_path: str) -> tuple[dict[str, Any], str]:
    """The model's config.json as a dict, and where it came from.

    A local folder gives its own config.json; ``arch:NAME[,key=value...]`` and hub ids found by name among the shipped
    architectures (``meta-llama/Llama-3.1-8B`` -> ``llama-3.1-8b.json``) need no network.
    """
    if name_or_path.startswith(ARCH_PREFIX):
        return arch_config(name_or_path), name_or_path
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text()), str(path / "config.json")
    if path.exists():
        raise UserError(
            f"model.name_or_path: {name_or_path} has no config.json: give a model folder saved by transformers"
        )
    key = shipped_name(name_or_path)
    if key is None:
        raise UserError(
            f"model.name_or_path: no local config for {name_or_path!r} and no shipped architecture by that name: give "
            f"a local model folder or one of {', '.join(ARCH_PREFIX + n for n in shipped_architectures())}"
        )
    return json.loads((ARCH_DIR / f"{key}.json").read_text()), f"{ARCH_PREFIX}{key}"


def shipped_architectures() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def shipped_name(hub_id: str) -> str | None:
    """The shipped architecture file for a hub id, matching its last part case-insensitively."""
    name = hub_id.rstrip("/").split("/")[-1].lower()
    shipped = set(shipped_architectures())
    for candidate in (name, SHAPE_SUFFIXES.sub("", name)):
        candidate = ALIASES.get(candidate, candidate)
        if candidate in shipped:
            return candidate
    return None


def arch_config(spec: str) -> dict[str, Any]:
    """Parse ``arch:NAME[,key=value,...]``: a shipped config with overrides (e.g. fewer layers for a CPU smoke run)."""
    name, *pairs = spec.removeprefix(ARCH_PREFIX).split(",")
    file = ARCH_DIR / f"{name}.json"
    if not file.is_file():
        raise UserError(
            f"model.name_or_path: unknown architecture {name!r}: use one of {', '.join(shipped_architectures())}"
        )
    config = json.loads(file.read_text())
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in config:
            raise UserError(
                f"model.name_or_path: override {pair!r} in {spec!r} must be key=value with a key of {name}.json"
            )
        config[key] = json.loads(value) if value not in ("", "None") else None
    return config


# ---------------------------------------------------------------------------------------------------------------
# Weights


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes allocates for one 4-bit weight of ``numel`` elements, constants included.

    n/2 bytes of codes, then per 64-weight block either one fp32 absmax (32/64 = 0.5 bit per weight) or, with double
    quantization, one 8-bit absmax plus one fp32 per 256 such blocks (8/64 + 32/(64*256) = 0.127 bit per weight).
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks + NF4_CODE_BYTES
    # + 4: the fp32 offset; each layer's quant state also holds its own copy of the second-level code book.
    return packed + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4 + NF4_CODE_BYTES + DQ_CODE_BYTES


def constant_bits_per_param(double_quant: bool) -> float:
    """Bits of quantization constants per weight, as the QLoRA paper counts them (0.5 without DQ, 0.127 with)."""
    return 8 / NF4_BLOCK + 32 / (NF4_BLOCK * DQ_BLOCK) if double_quant else 32 / NF4_BLOCK


def quantized_weight_bytes(shape: Shape, bits: int | None, double_quant: bool, dtype_bytes: int) -> int:
    """Bytes of every decoder-layer linear weight: 4-bit NF4, 8-bit (int8 + one fp32 scale per row), or unquantized."""
    total = 0
    for fan_in, fan_out in shape.linears().values():
        numel = fan_in * fan_out
        if bits == 4:
            total += nf4_bytes(numel, double_quant)
        elif bits == 8:
            total += numel + 4 * fan_out
        else:
            total += numel * dtype_bytes
    return total * shape.layers


# ---------------------------------------------------------------------------------------------------------------
# LoRA, gradients, optimizer


def lora_targets(target_modules: str | list[str], shape: Shape) -> list[str]:
    """The decoder-layer linears LoRA adapts: every one for all-linear, else the names given (checked)."""
    known = list(shape.linears())
    if target_modules == "all-linear":
        return known
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(
            f"lora.target_modules: {shape.name} has the linear layers {', '.join(known)}, not {', '.join(unknown)}"
        )
    return names


def lora_tensors(shape: Shape, r: int, targets: list[str]) -> list[int]:
    """Element counts of every LoRA tensor: A is r x in, B is out x r, for each target in each layer."""
    linears = shape.linears()
    per_layer = [n for t in targets for n in (r * linears[t][0], linears[t][1] * r)]
    return per_layer * shape.layers


def optimizer_bytes(tensors: list[int], optim: str, param_bytes: int) -> int:
    """Optimizer state bytes for trainable tensors of the given sizes.

    torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype (2 x param_bytes per weight); bitsandbytes'
    8-bit AdamW keeps two uint8 states plus an fp32 absmax per 256-element block for each (2 + 8/256 bytes), and fp32
    states (8 bytes) for tensors under 4096 elements; its 32-bit variants always use fp32 (8 bytes); SGD without
    momentum keeps nothing; Adafactor keeps factored row and column statistics (fp32).
    """
    name = optim.lower()
    if "8bit" in name:
        return sum(2 * n + 2 * 4 * math.ceil(n / BNB_OPT_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in tensors)
    if "bnb" in name or "32bit" in name or "paged" in name:
        return 8 * sum(tensors)
    if name.startswith("adamw") or name.startswith("adam") or name in ("lion", "adalomo"):
        factor = 1 if name in ("lion", "adalomo") else 2
        return factor * param_bytes * sum(tensors)
    if name == "sgd":
        return 0
    if name == "adafactor":
        return 4 * sum(2 * math.isqrt(n) for n in tensors)  # rows + columns of a roughly square factorisation
    raise UserError(
        f"training.optim: the planner has no formula for optimizer {optim!r}; use adamw_torch or paged_adamw_8bit"
    )


# ---------------------------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(
    shape: Shape,
    act_bytes: int,
    r: int,
    targets: list[str],
    lora_dropout: float,
    attn_implementation: str,
    length: int,
    liger: bool = False,
) -> int:
    """Bytes one decoder layer saves for backward, per token (Korthikanti et al. 2022, adapted to Llama layers).

    e = act_bytes (the compute dtype). Per token:
      attention half: RMSNorm input h*e + its fp32 upcast and normalised copy 2*h*4 + q/k/v input h*e
                      + q, k, v after RoPE (q + 2*kv)*e + attention output q*e (o_proj input)
      MLP half:       RMSNorm h*e + 2*h*4 + gate/up input h*e + gate, up, SiLU(gate), product 4*i*e
      LoRA:           per target, the dropout output in*e and its mask in*1 (only when dropout > 0), and A's output r*e
      eager attention also keeps scores and probabilities, 2*heads*length*e (sdpa/flash keep none).
      Liger kernels: each RMSNorm keeps 4 bytes (rstd) instead of 2*h*4, the SwiGLU 3*i*e instead of 4*i*e.
    """
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # Liger's RMSNorm keeps its input and one fp32 rstd per token instead of the fp32 copies; its SwiGLU keeps gate and
    # up and recomputes SiLU in backward, so one i-wide tensor fewer.
    norm = 4 if liger else 2 * h * 4
    swiglu = 3 * i if liger else 4 * i
    attention = h * act_bytes + norm + h * act_bytes + (q + 2 * kv) * act_bytes + q * act_bytes
    mlp = h * act_bytes + norm + h * act_bytes + swiglu * act_bytes
    linears = shape.linears()
    lora = sum((linears[t][0] * (act_bytes + 1) if lora_dropout > 0 else 0) + r * act_bytes for t in targets)
    scores = 2 * shape.heads * length * act_bytes if attn_implementation == "eager" else 0
    return attention + mlp + lora + scores


def logits_bytes(shape: Shape, act_bytes: int) -> int:
    """Per token: logits in the compute dtype, the fp32 copy the loss takes (none if already fp32), its fp32 grad."""
    return shape.vocab * (act_bytes + (4 if act_bytes != 4 else 0) + 4)


# trl's chunked loss (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE):
# the LM head is projected one tile of 4096 tokens x 32768 vocabulary entries at a time; a test pins both to trl's.
LOSS_TOKEN_TILE = 4096
LOSS_VOCAB_TILE = 32768
# Float32 tile-sized temporaries the torch fallback (trl's _backward_tile) holds at once: the tile in fp32, the scaled
# logits, log p, p, the gradient, and (1[target] - p) with its product by the incoming gradient. A Triton kernel
# folds the tile in place and keeps none.
TORCH_TILE_TEMPORARIES = 7
# Per token, float32: the loss's running statistics, log-probabilities, entropy and their gradients.
LOSS_TOKEN_STATS = 12


def chunked_loss_bytes(shape: Shape, act_bytes: int, tokens: int, triton: bool) -> int:
    """trl's loss, which never builds the logits: the final hidden states it keeps (h*e per token) and their fp32
    gradient (h*4), a dozen fp32 numbers per token, and one logits tile (plus its fp32 temporaries without Triton)."""
    tile = min(tokens, LOSS_TOKEN_TILE) * min(shape.vocab, LOSS_VOCAB_TILE)
    temporaries = 0 if triton else TORCH_TILE_TEMPORARIES * 4
    return tokens * (shape.hidden * (act_bytes + 4) + 4 * LOSS_TOKEN_STATS) + tile * (act_bytes + temporaries)


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """A predicted memory breakdown in bytes, and whether it fits."""

    model: str
    batch_size: int
    length: int
    parts: dict[str, int]
    params: dict[str, int]
    budget_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    # The longest data.max_length that fits the budget: as the recipe says, then with each memory switch flipped.
    longest: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total <= self.budget_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "batch_size": self.batch_size,
            "length": self.length,
            "parts": self.parts,
            "params": self.params,
            "total_bytes": self.total,
            "budget_bytes": self.budget_bytes,
            "fits": self.fits,
            "notes": self.notes,
            "suggestions": self.suggestions,
            "longest": self.longest,
        }


@dataclass
class Settings:
    """The recipe values memory depends on (kept separate so the formulas can be tested without a recipe)."""

    bits: int | None = 4
    double_quant: bool = True
    compute_bytes: int = 2
    r: int = 16
    targets: list[str] = field(default_factory=lambda: list(LORA_ALL_LINEAR))
    lora_dropout: float = 0.05
    optim: str = "adamw_torch"
    batch_size: int = 1
    length: int = 2048
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    # The long-context switches (qlora_kit.resolve.MemorySwitches says which recipe key sets each).
    every_n_layers: int = 1
    selective: bool = False
    offload_checkpoints: bool = False
    activation_offloading: bool = False
    liger: bool = False
    full_logits: bool = False
    # trl's chunked loss folds each logits tile in a Triton kernel on a GPU; elsewhere in torch ops, whose float32
    # temporaries of the tile are the largest transient of the step.
    triton: bool = True
    # trl casts LoRA weights to bf16 for quantized models (qlora-kit keeps them fp32 unless the compute is bf16).
    lora_bytes: int = 2
    # peft's prepare_model_for_kbit_training casts every unquantized 16-bit parameter to fp32; qlora-kit casts them
    # back under bf16 compute (model.keep_frozen_weights_in_bf16), so only fp16 and fp32 compute pay 4 bytes.
    unquantized_bytes: int = 4


def predict(shape: Shape, s: Settings) -> Plan:
    """The memory breakdown for one micro-batch of ``batch_size`` sequences of ``length`` tokens (packed: full)."""
    lora = lora_tensors(shape, s.r, s.targets)
    lora_params = sum(lora)
    tokens = s.batch_size * s.length
    per_layer = layer_activation_bytes(
        shape, s.compute_bytes, s.r, s.targets, s.lora_dropout, s.attn_implementation, s.length, s.liger
    )
    logits = tokens * logits_bytes(shape, s.compute_bytes)
    if not s.full_logits:
        logits = chunked_loss_bytes(shape, s.compute_bytes, tokens, s.triton)
    parts = {
        "quantized_weights": quantized_weight_bytes(shape, s.bits, s.double_quant, s.compute_bytes),
        "unquantized_weights": sum(shape.other_params().values()) * s.unquantized_bytes,
        "lora_weights": lora_params * s.lora_bytes,
        "gradients": lora_params * s.lora_bytes,
        "optimizer_states": optimizer_bytes(lora, s.optim, s.lora_bytes),
        "activations": tokens * activation_bytes_per_token(shape, s, per_layer),
        "logits": logits,
    }
    params = {
        "quantized": shape.linear_params(),
        "unquantized": sum(shape.other_params().values()),
        "lora": lora_params,
        "total": shape.total_params() + lora_params,
    }
    return Plan(model=shape.name, batch_size=s.batch_size, length=s.length, parts=parts, params=params)


def activation_bytes_per_token(shape: Shape, s: Settings, per_layer: int) -> int:
    """Activation bytes per token kept on the device through one step, for each checkpointing choice.

    Checkpointing every n-th layer (transformers' every_n_layers; 1 = every layer) keeps each checkpointed layer's
    input (h*e) and recomputes one layer at a time (per_layer); the other layers keep their full per_layer. Reentrant
    and non-reentrant checkpointing keep the same tensors. trl's selective checkpointing also keeps what attention
    returns in each checkpointed layer (its output q*e and an fp32 log-sum-exp per head). transformers' offload keeps
    the checkpointed inputs in host memory; trl's activation_offloading moves every saved activation there and brings
    back one layer's worth for its backward.
    """
    h, e, layers = shape.hidden, s.compute_bytes, shape.layers
    if s.activation_offloading:
        return per_layer
    if not s.gradient_checkpointing:
        return layers * per_layer
    checkpointed = math.ceil(layers / max(s.every_n_layers, 1))
    kept = 0 if s.offload_checkpoints else h * e
    if s.selective:
        kept += shape.heads * shape.head_dim * e + shape.heads * 4
    return checkpointed * kept + (layers - checkpointed) * per_layer + per_layer


def settings_from_recipe(recipe, machine: Machine, shape: Shape) -> Settings:
    """Read the memory-relevant values out of a validated recipe, with 'auto' resolved for ``machine`` exactly as
    training resolves it there (so the plan and the run agree)."""
    from qlora_kit.recipe import training_args

    args = training_args(recipe)
    quant = recipe.quantization
    resolved = resolve(recipe, machine, Launch())
    compute = dtype_name(resolved.compute_dtype)
    bits = 4 if quant.load_in_4bit else 8 if quant.load_in_8bit else None
    compute_bytes = DTYPE_BYTES[compute]
    weights = recipe.model.dtype if recipe.model.dtype != "auto" else compute
    return Settings(
        bits=bits,
        double_quant=quant.bnb_4bit_use_double_quant,
        compute_bytes=compute_bytes,
        r=recipe.lora.r,
        targets=lora_targets(recipe.lora.target_modules, shape),
        lora_dropout=recipe.lora.lora_dropout,
        optim=resolved.optim,
        batch_size=int(args["per_device_train_batch_size"]) * SEQUENCES_PER_EXAMPLE[recipe.method],
        length=recipe.data.max_length,
        gradient_checkpointing=resolved.memory.checkpointing,
        attn_implementation=resolved.attn_implementation,
        every_n_layers=resolved.memory.every_n_layers,
        selective=resolved.memory.selective,
        offload_checkpoints=resolved.memory.offload_checkpoints,
        activation_offloading=resolved.memory.activation_offloading,
        liger=resolved.memory.liger,
        full_logits=resolved.memory.full_logits,
        triton=machine.on_gpu,
        lora_bytes=2 if compute == "bfloat16" else 4,
        unquantized_bytes=(2 if compute == "bfloat16" else 4) if bits else DTYPE_BYTES[weights],
    )


def parse_memory(text: str) -> int:
    """'80GiB', '80GB', '24G', '512MiB' -> bytes (G and GiB are binary, GB is decimal)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match or not match.group(1).replace(".", "", 1).isdigit():
        raise UserError(f"--memory: cannot read {text!r}: write e.g. 80GiB, 24GB or 48G")
    number, prefix, suffix = float(match.group(1)), match.group(2), match.group(3)
    power = "_kmgt".index(prefix) if prefix else 0
    base = 1000 if suffix == "b" else 1024
    return int(number * base**power)


# Sequences one training example puts through the model with gradients: a pair's chosen and rejected answers run as
# one batch (DPO, ORPO, SimPO); KTO adds its mismatched KL completions. The reference pass of DPO and KTO runs without
# gradients, so it keeps no activations.
SEQUENCES_PER_EXAMPLE = {"sft": 1, "dpo": 2, "orpo": 2, "simpo": 2, "kto": 2}

# Left free for the CUDA context, cuBLAS workspaces and allocator fragmentation, none of which is in the breakdown.
HEADROOM_BYTES = GIB


# What `qlora-kit plan` sizes for on a machine without a GPU (unless told the memory): a common 80 GiB card.
ASSUMED_GPU = Machine(cuda_devices=1, name="an 80 GiB GPU (assumed)", capability=(8, 0), memory_bytes=80 * GIB)


def plan_recipe(recipe, budget_bytes: int | None = None, machine: Machine | None = None) -> Plan:
    """Predict the recipe's peak memory on ``machine`` (default: this one); with a budget, say whether it fits and
    which batch or length does."""
    machine = machine or this_machine()
    config, source = read_config(recipe.model.name_or_path)
    shape = Shape.from_config(config, name=source)
    settings = settings_from_recipe(recipe, machine, shape)
    result = predict(shape, settings)
    result.notes.append(f"config from {source}; compute {settings.compute_bytes * 8}-bit, optimizer {settings.optim}")
    if recipe.method != "sft":
        result.notes.append(
            f"{recipe.method}: {SEQUENCES_PER_EXAMPLE[recipe.method]} sequences per example, so batch "
            f"{settings.batch_size} is per_device_train_batch_size x {SEQUENCES_PER_EXAMPLE[recipe.method]}"
        )
    if budget_bytes is not None:
        result.budget_bytes = budget_bytes - HEADROOM_BYTES
        if not result.fits:
            result.suggestions = suggest(shape, settings, result.budget_bytes)
        result.longest = [
            {"switch": label, "max_length": longest_length(shape, variant, result.budget_bytes)}
            for label, variant in switch_variants(settings)
        ]
    return result


# ---------------------------------------------------------------------------------------------------------------
# The longest sequence that fits, with and without each memory switch

LENGTH_STEP = 128  # lengths are searched in multiples of this many tokens
LENGTH_CAP = 2**22  # 4M tokens: past any model's positions, so a budget that fits more says "at least this"

CHECKPOINTING = "training.activation_checkpointing"
CHECKPOINT_KWARGS = "training.activation_checkpointing_kwargs"
# (recipe key, Settings field, whether it refines checkpointing and so turns it on too)
SWITCHES = (
    (CHECKPOINTING, "gradient_checkpointing", False),
    (f"{CHECKPOINT_KWARGS}.selective", "selective", True),
    (f"{CHECKPOINT_KWARGS}.offload", "offload_checkpoints", True),
    ("training.activation_offloading", "activation_offloading", False),
    ("training.use_liger_kernel", "liger", False),
)


def longest_length(shape: Shape, s: Settings, budget: int, step: int = LENGTH_STEP, cap: int = LENGTH_CAP) -> int:
    """The longest length, in multiples of ``step``, whose predicted peak at the settings' batch size fits ``budget``
    (0: not even ``step`` tokens fit). Every part of the plan grows with the length, so a bisection finds it."""
    from dataclasses import replace

    def fits(multiple: int) -> bool:
        return predict(shape, replace(s, length=multiple * step)).total <= budget

    if not fits(1):
        return 0
    low, high = 1, cap // step
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low * step


def switch_variants(s: Settings) -> list[tuple[str, Settings]]:
    """The recipe's settings, then each memory switch flipped on its own (a refinement of checkpointing turns
    checkpointing on with it), then the loss with the full logits (what label_smoothing_factor > 0 makes trl build)."""
    from dataclasses import replace

    variants = [("as the recipe says", s)]
    for key, name, refines in SWITCHES:
        value = not getattr(s, name)
        changes = {name: value, **({"gradient_checkpointing": True} if refines and value else {})}
        variants.append((f"{key}={str(value).lower()}", replace(s, **changes)))
    if s.every_n_layers == 1:
        changes = {"every_n_layers": 2, "gradient_checkpointing": True}
        variants.append((f"{CHECKPOINT_KWARGS}.every_n_layers=2", replace(s, **changes)))
    loss = (
        "training.label_smoothing_factor=0 (chunked loss)"
        if s.full_logits
        else ("training.label_smoothing_factor>0 (full logits)")
    )
    variants.append((loss, replace(s, full_logits=not s.full_logits)))
    return variants


def suggest(shape: Shape, s: Settings, budget: int) -> list[str]:
    """Smaller batch sizes at the same length, then shorter lengths at batch 1, then checkpointing if it is off."""
    from dataclasses import replace

    tips = []
    for batch in _halvings(s.batch_size):
        if predict(shape, replace(s, batch_size=batch)).total <= budget:
            accumulation = math.ceil(s.batch_size / batch)
            tips.append(
                f"per_device_train_batch_size={batch} fits at length {s.length} "
                f"(gradient_accumulation_steps x{accumulation} keeps the effective batch)"
            )
            return tips
    if not s.gradient_checkpointing and predict(shape, replace(s, gradient_checkpointing=True)).total <= budget:
        tips.append("training.gradient_checkpointing=true makes it fit")
    for length in _halvings(s.length):
        if predict(shape, replace(s, batch_size=1, length=length)).total <= budget:
            tips.append(f"data.max_length={length} fits at per_device_train_batch_size=1")
            break
    if not tips:
        tips.append("nothing fits: the weights alone exceed the budget; use a smaller model or a larger GPU")
    return tips


def _halvings(start: int) -> list[int]:
    values, value = [], start // 2
    while value >= 1:
        values.append(value)
        value //= 2
    return values
