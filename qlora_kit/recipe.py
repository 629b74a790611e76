"""The recipe: one YAML file that says what to fine-tune, on what, and how.

Sections mirror the libraries they feed: ``quantization`` uses transformers' BitsAndBytesConfig names, ``lora`` uses
peft's LoraConfig names, and ``training`` takes any field of trl's SFTConfig. Every problem in a recipe is collected
and reported at once, each under its dotted key, and unknown keys are errors (with the closest valid name).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import tempfile
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from qlora_kit.errors import UserError

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "unpaired"]
Method = Literal["sft", "dpo", "orpo", "kto", "simpo"]

# The trl config each method's ``training`` section is checked against (SimPO is trl's CPO with the SimPO loss).
METHOD_CONFIGS = {
    "sft": ("trl", "SFTConfig"),
    "dpo": ("trl", "DPOConfig"),
    "kto": ("trl", "KTOConfig"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig"),
    "simpo": ("trl.experimental.cpo", "CPOConfig"),
}

# SFTConfig fields that another section of the recipe owns, and where to set them instead.
OWNED_TRAINING_FIELDS = {
    "output_dir": "output_dir (top level) or --output-dir",
    "max_length": "data.max_length",
    "model_init_kwargs": "the model section",
    "trust_remote_code": "model.trust_remote_code",
    "chat_template_path": "model.chat_template",
    "dataset_text_field": "data.train[].format",
    "dataset_kwargs": "the data section",
    "assistant_only_loss": "data (qlora-kit always trains on assistant/completion tokens only)",
    "completion_only_loss": "data (qlora-kit always trains on assistant/completion tokens only)",
    "eos_token": "model.chat_template (EOS ends every example automatically)",
    "pad_token": "nothing: qlora-kit picks a pad token that is not EOS",
}

# Fields of the preference configs that qlora-kit's own tokenization owns (it renders and truncates every pair).
OWNED_PREFERENCE_FIELDS = {
    "truncation_mode": "nothing: qlora-kit truncates the prompt from the left first, then the answers' ends",
    "max_completion_length": "data.max_length (the prompt is cut first, then the answers)",
    "padding_free": "nothing: preference batches are padded",
    "padding_value": "nothing: qlora-kit picks a pad token that is not EOS",
    "is_encoder_decoder": "nothing: qlora-kit trains causal LMs",
    "dataset_num_proc": "data.num_proc",
}

# List fields whose trl config also takes one string (DPOConfig turns `loss_type: ipo` into ["ipo"]).
STRING_AS_LIST = ("loss_type",)

# Fields whose value a method fixes: SimPO is CPO with the SimPO loss and no behaviour-cloning term.
METHOD_FIXED = {"simpo": {"loss_type": "simpo", "cpo_alpha": 0.0}}

# Defaults qlora-kit sets where SFTConfig's own suit full fine-tuning rather than QLoRA; the recipe can override each.
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0,
    "logging_steps": 5,
    # The first and the last step are always logged (see train.LogLastStep), so every run records where it started.
    "logging_first_step": True,
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 2,
    # Packed rows without padding: the fastest default on every kernel (see data/collate.py for sdpa and eager).
    "packing": True,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "report_to": "tensorboard",
    "seed": 42,
}

# Preference methods take qlora-kit's defaults except these: no packing (pairs stay whole) and a learning rate suited
# to LoRA under a KL-style objective (trl's 1e-6 is for full fine-tuning; 2e-4 overshoots).
PREFERENCE_DEFAULTS: dict[str, Any] = {"learning_rate": 5e-5}
PREFERENCE_DROPPED = ("packing",)

SECRET_WORDS = ("token", "secret", "password", "apikey", "api_key", "access_key")


def is_secret_key(key: str) -> bool:
    """Whether a key names a credential: one of SECRET_WORDS as whole underscore-separated words (``hub_token``,
    ``api_key``), so ``tokenizer_name_or_path`` or ``max_new_tokens`` are not taken for one."""
    words = f"_{key.lower()}_"
    return any(f"_{word}_" in words for word in SECRET_WORDS)


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSection(Section):
    name_or_path: str = Field(description="Hub model id or local directory of the pretrained causal LM.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    tokenizer_name_or_path: str | None = Field(None, description="Tokenizer to use, when not the model's own.")
    dtype: Dtype = Field(
        "auto", description="dtype of the weights that stay unquantized; auto follows the compute dtype."
    )
    attn_implementation: Literal[
        "auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = Field(
        "auto",
        description="Attention kernel passed to from_pretrained; auto takes the fastest the machine has: "
        "flash_attention_2 on a GPU of compute capability 8.0+ with the flash-attn package and 16-bit compute, "
        "else sdpa.",
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped in the checkpoint. Off unless you trust it."
    )
    allow_pickle: bool = Field(False, description="Allow .bin/.pt (pickle) weights; by default only safetensors load.")
    chat_template: str | None = Field(
        None,
        description="Chat template: a name shipped with qlora-kit (e.g. chatml), a path to a .jinja file, or empty "
        "for "
        "the tokenizer's own (ChatML when it has none).",
    )
    adapter: str | None = Field(
        None,
        description="Preference methods: a PEFT adapter to train further instead of a fresh one (a run directory "
        "such as runs/sft, or an adapter folder); its frozen copy is the reference model. The lora section is then "
        "the adapter's own.",
    )


class QuantizationSection(Section):
    load_in_4bit: bool = Field(True, description="Load the base in 4-bit (QLoRA).")
    load_in_8bit: bool = Field(False, description="Load the base in 8-bit instead (for comparison).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(
        True, description="Quantize the quantization constants too (saves ~0.37 bit/param)."
    )
    bnb_4bit_compute_dtype: Dtype = Field(
        "auto",
        description="dtype of the matmuls; auto = bfloat16 on a GPU with native bf16 (compute capability 8.0+), "
        "float32 otherwise (T4, V100, CPU).",
    )
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="Storage dtype of packed 4-bit weights; FSDP needs it equal to the compute dtype."
    )

    @model_validator(mode="after")
    def _one_mode(self) -> QuantizationSection:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError(
                "load_in_4bit and load_in_8bit are both true: choose one (or neither for no quantization)"
            )
        return self


class LoraSection(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r)).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt: all-linear or a list of names."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] | None = Field(None, description="Modules trained in full and saved with the adapter.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")


class DataSource(Section):
    path: str = Field(
        description="Local file (.jsonl, .json, .csv, .parquet, .txt), directory or glob of them, or hub dataset id."
    )
    format: DataFormat = Field(
        "auto",
        description="Row format; auto detects it from the columns and says which. Preference methods read "
        "preference (prompt/chosen/rejected); kto also reads unpaired (prompt/completion/label) and unpairs "
        "preference rows into them.",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    name: str | None = Field(None, description="Hub dataset config name.")
    revision: str | None = Field(None, description="Hub dataset revision (a commit makes the cache key exact).")
    columns: dict[str, str] | None = Field(
        None, description="Column mapping {format column: column in this source}, e.g. {messages: convo}."
    )
    weight: float | None = Field(
        None, gt=0, description="Relative share of this source among the weighted sources of the training mix."
    )
    fraction: float | None = Field(
        None, gt=0, description="Fraction of this source's rows to use (above 1 repeats rows)."
    )
    sample_by: Literal["line", "paragraph", "document"] = Field(
        "line", description="For .txt files: one text row per line, per blank-line paragraph or per file."
    )
    reasoning: Literal["train", "mask", "drop"] = Field(
        "train",
        description="Assistant reasoning (reasoning_content/thinking): train on it with the answer, show it but train "
        "on the answer only (mask), or drop it before rendering.",
    )
    enable_thinking: bool | None = Field(
        None,
        description="Passed to the chat template (Qwen3-style think/no-think modes) when training, in the pre-flight "
        "check and at evaluation; unset: the template's default.",
    )

    @model_validator(mode="after")
    def _one_share(self) -> DataSource:
        if self.weight is not None and self.fraction is not None:
            raise ValueError("weight and fraction are both set: a source is either weighted or a fraction of itself")
        return self


class DataSection(Section):
    train: list[DataSource] = Field(min_length=1, description="Training sources.")
    eval: DataSource | None = Field(None, description="Held-out evaluation source.")
    eval_split: float | None = Field(None, gt=0, lt=1, description="Fraction of train held out for evaluation.")
    max_length: int = Field(1024, gt=0, description="Longest tokenized example.")
    truncation: Literal["truncate_prompt", "drop_turns", "truncate", "drop"] = Field(
        "truncate_prompt",
        description="Longer examples: cut the prompt from the left so the last answer survives (truncate_prompt), "
        "drop whole earlier turns keeping the system prompt (drop_turns), cut the end (truncate), or drop them.",
    )
    seed: int = Field(42, description="Seed for the eval split, mixing and shuffling.")
    dedupe: bool = Field(False, description="Drop repeated examples (and training examples equal to held-out ones).")
    max_bad_rows: int = Field(
        0, ge=0, description="Skip up to this many invalid rows (counted by reason); one more is an error."
    )
    num_proc: int | None = Field(
        None, gt=0, description="Processes for tokenization; default: several for large datasets, one otherwise."
    )
    cache: bool = Field(True, description="Reuse the processed dataset when nothing that decides it has changed.")
    cache_dir: str | None = Field(
        None, description="Processed-data cache folder; default $QLORA_KIT_CACHE/data or ~/.cache/qlora-kit/data."
    )

    @model_validator(mode="after")
    def _one_eval(self) -> DataSection:
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("data.eval and data.eval_split are both set: use one held-out source")
        if self.eval is not None and self.eval.weight is not None:
            raise ValueError("data.eval.weight: weights mix training sources; use fraction to subsample held-out data")
        return self


class LmEvalSection(Section):
    """Standard benchmarks through lm-evaluation-harness (the ``lm-eval`` extra); names mirror its simple_evaluate."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval task, group or tag names; empty runs none.")
    limit: float | None = Field(
        None, gt=0, description="Examples per task (an integer), or a fraction of each task below 1; empty for all."
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per prompt; empty keeps the task's own."
    )
    batch_size: int = Field(8, gt=0, description="Requests per forward pass.")
    include_path: str | None = Field(None, description="Folder of extra task YAML files (your own tasks).")
    include_defaults: bool = Field(True, description="Also index lm-eval's built-in tasks (takes a few seconds).")


class EvalSection(Section):
    num_samples: int = Field(4, ge=0, description="Held-out prompts generated before and after training.")
    max_new_tokens: int = Field(48, gt=0, description="Longest generation.")
    max_examples: int = Field(256, gt=0, description="Most held-out examples scored (and, in eval, generated).")
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match", "rouge", "bleu", "chrf"],
        description="Generation metrics for qlora-kit eval: built-in names (exact_match, rouge, bleu, chrf), a path "
        "to an evaluate metric script, or module:function (a Python function of predictions and references).",
    )
    batch_size: int = Field(8, gt=0, description="Prompts generated (and examples scored) together.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    top_k: int = Field(50, ge=0, description="Sample among the k likeliest tokens (with do_sample); 0 for all.")
    seed: int = Field(42, description="Seed set before each model generates, so sampled runs compare like for like.")
    lm_eval: LmEvalSection = Field(default_factory=LmEvalSection, description="lm-evaluation-harness benchmarks.")
    callback_steps: int = Field(
        0,
        ge=0,
        description="During training, generate on held-out prompts every this many steps and log "
        "eval_exact_match; 0 turns it off.",
    )
    callback_samples: int = Field(8, gt=0, description="Held-out prompts the in-training generation eval uses.")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, metrics: list[str]) -> list[str]:
        from qlora_kit.metrics import BUILTIN_METRICS

        for name in metrics:
            looks_custom = ":" in name or "/" in name or name.endswith(".py")
            if not looks_custom and name not in BUILTIN_METRICS:
                raise ValueError(
                    f"unknown metric {name!r}{_suggest(name, list(BUILTIN_METRICS))}: use one of "
                    f"{', '.join(BUILTIN_METRICS)}, a path to an evaluate metric script, or module:function"
                )
        return metrics


class LaunchSection(Section):
    accelerate_profile: str | None = Field(
        None,
        description="accelerate profile to launch with: a name shipped in recipes/accelerate (single_gpu, ddp, "
        "fsdp_qlora, zero3, multi_node) or a path to an accelerate config YAML. --accelerate-profile overrides it.",
    )
    device_map: Literal["per_process", "auto", "balanced", "sequential"] = Field(
        "per_process",
        description="per_process: every process loads the whole model onto its own device (DDP, or one GPU); auto, "
        "balanced, sequential: one process spreads the model over all visible GPUs (no DDP).",
    )


class MergeAdapter(Section):
    path: str = Field(description="Another adapter to merge: a run directory (with adapter/) or a PEFT adapter.")
    weight: float = Field(1.0, description="Its weight in the linear combination of adapter deltas.")


class MergeSection(Section):
    strategy: Literal["dequantized", "original"] = Field(
        "dequantized",
        description="Base weights: dequantized = the 4-bit weights the adapter was trained against (reproduces the "
        "trained model); original = the full-precision checkpoint (differs by the quantization error).",
    )
    dtype: Dtype = Field("auto", description="dtype of the merged weights; auto = the trained model's weights dtype.")
    weight: float = Field(1.0, description="Weight of the run's own adapter in the linear combination.")
    adapters: list[MergeAdapter] = Field(default_factory=list, description="Further adapters merged with weights.")
    max_shard_size: str = Field("5GB", description="Largest output safetensors shard, e.g. 2GB or 500MB.")
    verify: bool = Field(True, description="Compare the merged model with the adapter on the 4-bit base.")
    verify_examples: int = Field(16, gt=0, description="Held-out examples for the logit and loss comparison.")
    verify_generations: int = Field(4, ge=0, description="Held-out prompts whose greedy generations must agree.")
    max_abs_logit_diff: float = Field(1.0, gt=0, description="Most allowed max |logit difference|.")
    mean_abs_logit_diff: float = Field(0.05, gt=0, description="Most allowed mean |logit difference|.")
    max_loss_diff: float = Field(
        0.01,
        gt=0,
        description="Most allowed |held-out loss difference| (merged vs adapter, and adapter now vs "
        "the loss recorded at training time, which catches a changed base).",
    )
    min_generation_agreement: float = Field(
        0.75, ge=0, le=1, description="Least fraction of greedy generations identical to the adapter's."
    )
    enforce_thresholds: bool | None = Field(
        None,
        description="Fail the merge beyond a threshold; default true for dequantized, false for original "
        "(whose difference is expected and only reported).",
    )


GgufType = Literal["f32", "f16", "bf16", "q8_0", "q5_k_m", "q4_k_m"]


class GgufThresholds(Section):
    """One limit per GGUF type; the defaults are documented in docs/export.md."""

    f32: float = Field(
        0.001, ge=0, description="Most allowed relative perplexity increase of f32 files over the merged model."
    )
    f16: float = Field(
        0.005, ge=0, description="Most allowed relative perplexity increase of f16 files over the merged model."
    )
    bf16: float = Field(
        0.02, ge=0, description="Most allowed relative perplexity increase of bf16 files over the merged model."
    )
    q8_0: float = Field(
        0.02, ge=0, description="Most allowed relative perplexity increase of q8_0 files over the merged model."
    )
    q5_k_m: float = Field(
        0.05, ge=0, description="Most allowed relative perplexity increase of q5_k_m files over the merged model."
    )
    q4_k_m: float = Field(
        0.10, ge=0, description="Most allowed relative perplexity increase of q4_k_m files over the merged model."
    )


class GgufAgreement(Section):
    """Least fraction of held-out greedy generations identical to the merged model's, per GGUF type."""

    f32: float = Field(
        1.0, ge=0, le=1, description="Least share of f32 greedy generations equal to the merged model's."
    )
    f16: float = Field(
        1.0, ge=0, le=1, description="Least share of f16 greedy generations equal to the merged model's."
    )
    bf16: float = Field(
        1.0, ge=0, le=1, description="Least share of bf16 greedy generations equal to the merged model's."
    )
    q8_0: float = Field(
        1.0, ge=0, le=1, description="Least share of q8_0 greedy generations equal to the merged model's."
    )
    q5_k_m: float = Field(
        0.0, ge=0, le=1, description="Least share of q5_k_m greedy generations equal to the merged model's."
    )
    q4_k_m: float = Field(
        0.0, ge=0, le=1, description="Least share of q4_k_m greedy generations equal to the merged model's."
    )


class ExportSection(Section):
    format: Literal["gguf"] = Field("gguf", description="Export format: gguf (llama.cpp, Ollama, LM Studio).")
    types: list[GgufType] = Field(
        default_factory=lambda: ["q8_0", "q4_k_m"],
        min_length=1,
        description="GGUF types written, each its own file: f32, f16, bf16, q8_0, q5_k_m, q4_k_m.",
    )
    output: str | None = Field(
        None, description="Export folder; default RUN_DIR/gguf (RUN_DIR/gguf-lora with adapter_only)."
    )
    adapter_only: bool = Field(
        False, description="Write the adapter as a GGUF LoRA (plus a GGUF of the base to apply it on) instead."
    )
    pre_tokenizer: str | None = Field(
        None,
        description="llama.cpp pre-tokenizer name for a BPE tokenizer llama.cpp does not recognize; default: the "
        "first of smollm, gpt-2, qwen2, llama-bpe that tokenizes the held-out text exactly as the tokenizer does.",
    )
    system_prompt: str | None = Field(None, description="SYSTEM line of the Ollama Modelfile.")
    verify: bool = Field(
        True, description="Check every GGUF in llama.cpp against the merged model; fail beyond the thresholds."
    )
    verify_examples: int = Field(16, gt=0, description="Held-out examples for the perplexity comparison.")
    verify_generations: int = Field(8, ge=0, description="Held-out prompts whose greedy generations are compared.")
    max_new_tokens: int = Field(24, gt=0, description="Tokens generated per held-out prompt when comparing.")
    max_perplexity_increase: GgufThresholds = Field(
        default_factory=GgufThresholds,
        description="Most allowed relative held-out perplexity increase of each GGUF type over the merged model "
        "(0.10 = 10%).",
    )
    min_generation_agreement: GgufAgreement = Field(
        default_factory=GgufAgreement,
        description="Least fraction of greedy generations identical to the merged model's, per GGUF type.",
    )


class Recipe(Section):
    method: Method = Field(
        "sft",
        description="sft (supervised, trl's SFTTrainer), or a preference method on chosen/rejected data: dpo "
        "(DPOTrainer, any of its loss_type variants), orpo (ORPOTrainer), kto (KTOTrainer, unpaired rows, or pairs it "
        "unpairs), simpo (CPOTrainer with loss_type simpo).",
    )
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="Any field of the method's trl config: SFTConfig (sft), DPOConfig (dpo), ORPOConfig (orpo), "
        "KTOConfig (kto), CPOConfig (simpo), e.g. beta and loss_type.",
    )
    eval: EvalSection = Field(default_factory=EvalSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    export: ExportSection = Field(default_factory=ExportSection)
    output_dir: str | None = Field(None, description="Run directory; default runs/<recipe name>.")

    @model_validator(mode="after")
    def _adapter_needs_preference(self) -> Recipe:
        if self.model.adapter is not None and self.method == "sft":
            raise ValueError(
                "model.adapter: training an existing adapter further is for preference methods: set method (dpo, "
                "orpo, kto, simpo) or remove model.adapter"
            )
        return self


# ---------------------------------------------------------------------------------------------------------------
# The training section: checked against SFTConfig's real fields and types.


def config_class(method: str = "sft") -> type:
    """trl's config class for ``method`` (imported on first use: ORPO and CPO live in trl.experimental)."""
    import importlib

    module, name = METHOD_CONFIGS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental announces itself on import
        return getattr(importlib.import_module(module), name)


@functools.cache
def _field_model(method: str = "sft") -> type[BaseModel]:
    """A pydantic model with one optional field per init field of the method's trl config, typed as it declares."""
    config = config_class(method)
    hints = typing.get_type_hints(config)
    for name in STRING_AS_LIST:
        if name in hints and typing.get_origin(hints[name]) is list:
            hints[name] = hints[name] | typing.get_args(hints[name])[0]
    fields = {f.name: (typing.Optional[hints.get(f.name, Any)], None) for f in dataclasses.fields(config) if f.init}  # noqa: UP045
    return create_model(
        f"{config.__name__}Fields", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True), **fields
    )


def _sft_field_model() -> type[BaseModel]:
    return _field_model("sft")


def sft_field_names() -> list[str]:
    return field_names("sft")


def field_names(method: str = "sft") -> list[str]:
    return sorted(_field_model(method).model_fields)


def owned_fields(method: str = "sft") -> dict[str, str]:
    """Config fields another part of the recipe owns, and where to set them, for ``method``."""
    return OWNED_TRAINING_FIELDS if method == "sft" else {**OWNED_TRAINING_FIELDS, **OWNED_PREFERENCE_FIELDS}


def method_defaults(method: str = "sft") -> dict[str, Any]:
    """qlora-kit's training defaults for ``method``."""
    if method == "sft":
        return dict(TRAINING_DEFAULTS)
    kept = {k: v for k, v in TRAINING_DEFAULTS.items() if k not in PREFERENCE_DROPPED}
    return {**kept, **PREFERENCE_DEFAULTS, **METHOD_FIXED.get(method, {})}


def _check_fixed(training: dict[str, Any], method: str) -> list[str]:
    fixed = METHOD_FIXED.get(method, {})
    return [
        f"training.{key}: method {method} fixes it to {value!r}; remove the key (or choose another method)"
        for key, value in fixed.items()
        if key in training and training[key] != value
    ]


def _check_training(training: Any, method: str = "sft") -> list[str]:
    config_name = METHOD_CONFIGS[method][1]
    if not isinstance(training, dict):
        return [f"training: expected a mapping of {config_name} fields, got {type(training).__name__}"]
    problems = []
    names, owned = field_names(method), owned_fields(method)
    for key in training:
        if key in owned:
            problems.append(f"training.{key}: set it in {owned[key]} instead")
        elif key not in names:
            problems.append(f"training.{key}: not a field of trl's {config_name}{_suggest(key, names)}")
    problems += _check_fixed(training, method)
    known = {k: v for k, v in training.items() if k in names and k not in owned}
    try:
        _field_model(method)(**known)
    except ValidationError as exc:
        problems += [_format_error(err, prefix="training", method=method) for err in exc.errors()]
    problems += _check_choices(known, method)
    merged = {**method_defaults(method), **known}
    positive = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps")
    intervals = [f"{kind}_steps" for kind in ("logging", "save", "eval") if merged.get(f"{kind}_strategy") == "steps"]
    for key in (*positive, *intervals):
        value = merged.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            problems.append(f"training.{key}: must be > 0, got {value}")
    problems += _check_numbers(known)
    if not problems:
        problems += _check_steps(merged) or trainer_config_problems(merged, method=method)
    return problems


@functools.cache
def field_choices(method: str = "sft") -> dict[str, tuple[str, ...]]:
    """The values trl's config accepts for each of its choice fields: the field's ``choices`` metadata, else the
    values its help lists after "Possible values are:" (how DPOConfig documents ``loss_type``, which trl itself only
    rejects at the first training step)."""
    out = {}
    for spec in dataclasses.fields(config_class(method)):
        metadata = spec.metadata or {}
        choices = metadata.get("choices")
        if choices is None:
            listed = re.search(r"Possible values are:(.*?)\.(?:\s|$)", metadata.get("help", ""), re.DOTALL)
            choices = re.findall(r"`'?([\w-]+)'?`", listed.group(1)) if listed else None
        if choices:
            out[spec.name] = tuple(choices)
    return out


def _check_choices(training: dict[str, Any], method: str) -> list[str]:
    """A choice field's value (or each value of a list, as DPO's loss_type takes) must be one trl accepts."""
    config_name = METHOD_CONFIGS[method][1]
    problems = []
    for key, allowed in field_choices(method).items():
        value = training.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item not in allowed:
                problems.append(
                    f"training.{key}: {item!r} is not a {key} of trl's {config_name}"
                    f"{_suggest(item, list(allowed))}; choose one of {', '.join(allowed)}"
                )
    return problems


def _check_numbers(training: dict[str, Any]) -> list[str]:
    return [
        f"training.{key}: must be a finite number, got {value}"
        for key, value in training.items()
        if isinstance(value, float) and not math.isfinite(value)
    ]


def _check_steps(training: dict[str, Any]) -> list[str]:
    """A run that would train no step is refused before anything loads (it would publish an untrained adapter)."""
    max_steps, epochs = training.get("max_steps"), training.get("num_train_epochs")
    if isinstance(max_steps, int) and max_steps > 0:
        return []
    if isinstance(epochs, int | float) and epochs <= 0:
        return [f"training.num_train_epochs: {epochs} trains no step: set it above 0, or set training.max_steps"]
    return []


# Messages trl/transformers raise only because this machine lacks the hardware a recipe is written for; they are
# checked again, for real, when training builds its config on the machine that trains.
MACHINE_SPECIFIC = ("doesn't support bf16/gpu", "requires a GPU", "requires CUDA", "CUDA", "NPU", "XPU")


def trainer_config_problems(training: dict[str, Any], on_cpu: bool = True, method: str = "sft") -> list[str]:
    """Build the method's trl config from ``training`` and report what its own validation rejects, by recipe key."""
    config = config_class(method)
    args = {key: value for key, value in training.items() if key not in ("report_to",)}
    args.setdefault("use_cpu", on_cpu)
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only its errors matter here; training shows its warnings once
        try:
            config(output_dir=scratch, report_to="none", **args)
        except (ValueError, TypeError) as exc:
            message = str(exc).strip().replace("\n", " ")
            if on_cpu and any(word in message for word in MACHINE_SPECIFIC):
                return []
            return [f"{culprit_key(training, message)}: {message}"]
    return []


def culprit_key(training: dict[str, Any], message: str) -> str:
    """The recipe key a trainer-config error is about: the first key (or value) the message names."""
    for key in sorted(training, key=len, reverse=True):
        if key in message:
            return f"training.{key}"
    for key, value in training.items():
        if isinstance(value, str) and value and value in message:
            return f"training.{key}"
    return "training"


def normalize_strategies(training: Any) -> Any:
    """YAML reads ``no`` as false; the *_strategy fields of trl's docs mean the string 'no'."""
    if not isinstance(training, dict):
        return training
    return {k: "no" if k.endswith("_strategy") and v is False else v for k, v in training.items()}


# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides and validation.


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader (no Python objects from YAML) that refuses a key written twice in one mapping."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise UserError(
                f"{loader.name}: key {key!r} is written twice (lines {seen[key]} and {line}); keep one of them"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file, or a UserError naming the file and the first byte that is not UTF-8."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: give the path to a file")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: give the path to a .yaml recipe")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{what} {path} is not UTF-8 text: byte {exc.start} (line {line}) is {data[exc.start : exc.start + 1]!r}; "
            "save the file as UTF-8"
        ) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file with the safe loader (no Python objects can be constructed from YAML)."""
    path = Path(path)
    text = read_text(path, "recipe file")
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"recipe file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise UserError(
            f"recipe file {path} must hold a mapping of sections (model, data, ...), not {type(data).__name__}"
        )
    return data


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values parse as YAML scalars, numeric parts index lists."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value: write e.g. training.max_steps=5")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.split("."), value, key)
    return raw


def _set_dotted(node: Any, parts: list[str], value: Any, key: str) -> None:
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise UserError(f"override {key}: '{part}' is not an index into a list of {len(node)}")
            index = int(part)
            if index == len(node):
                node.append({})
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, [] if parts[depth + 1].isdigit() else {})
        else:
            raise UserError(f"override {key}: '{'.'.join(parts[:depth])}' is a value, not a section")


def validate(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a raw recipe mapping; raise one UserError listing every problem by dotted key."""
    problems = []
    recipe = None
    if isinstance(raw.get("training"), dict):
        raw = {**raw, "training": normalize_strategies(raw["training"])}
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [_format_error(err, raw=raw) for err in exc.errors()]
    method = raw.get("method", "sft")
    problems += _check_training(raw.get("training", {}) or {}, method if method in METHOD_CONFIGS else "sft")
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "a problem"
        raise UserError(f"{source} has {count}: " + "; ".join(problems))
    assert recipe is not None
    recipe.training = numbers_from_text(recipe.training, recipe.method)
    return recipe


def numbers_from_text(training: dict[str, Any], method: str) -> dict[str, Any]:
    """Numbers YAML reads as text (``1e-3`` has no dot, so YAML 1.1 reads a string) as the numbers the config's
    field types make of them, so the trainer gets ``0.001`` and not ``"1e-3"``."""
    fields = _field_model(method).model_fields
    texts = {k: v for k, v in training.items() if isinstance(v, str) and k in fields}
    if not texts:
        return training
    parsed = _field_model(method)(**texts)
    numbers = {k: getattr(parsed, k) for k in texts if isinstance(getattr(parsed, k), int | float)}
    return {**training, **numbers}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    recipe = validate(raw, source=str(path))
    if recipe.output_dir is None:
        recipe.output_dir = str(Path("runs") / Path(path).stem)
    return recipe


def training_args(recipe: Recipe) -> dict[str, Any]:
    """The trl config's keyword arguments: qlora-kit's defaults for the method under the recipe's own fields."""
    return {**method_defaults(recipe.method), **recipe.training}


def resolved_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as it will run (defaults filled in), with secrets redacted, for recipe.yaml."""
    data = recipe.model_dump(mode="json")
    data["training"] = training_args(recipe)
    return redact(data)


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def redact(node: Any, key: str = "") -> Any:
    """Replace the value of any key that looks like a credential with '<redacted>'."""
    if isinstance(node, dict):
        return {k: redact(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v, key) for v in node]
    if node and isinstance(node, str) and is_secret_key(key):
        return "<redacted>"
    return node


# ---------------------------------------------------------------------------------------------------------------
# Error formatting.


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _valid_keys(model: type[BaseModel], raw: Any, loc: tuple) -> list[str]:
    """The field names allowed at the parent of ``loc``, for 'did you mean' suggestions."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *typing.get_args(annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        nested += [
            a for c in candidates for a in typing.get_args(c) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _format_error(err: dict[str, Any], prefix: str = "", raw: Any = None, method: str = "sft") -> str:
    loc = tuple(err["loc"])
    # pydantic appends the union branch or validator name to some locations; keep only real keys.
    loc = tuple(p for p in loc if isinstance(p, int) or not (p.startswith(("function-", "literal[")) or "[" in p))
    key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc) or prefix or "recipe"
    kind = err["type"]
    if kind == "extra_forbidden":
        names = _valid_keys(Recipe, raw, loc) if not prefix else field_names(method)
        return f"{key}: unknown key{_suggest(str(loc[-1]), names)}"
    if kind == "missing":
        return f"{key}: required but missing"
    given = err.get("input")
    shown = "" if isinstance(given, dict | list) else f" (got {given!r})"
    message = err["msg"].removeprefix("Value error, ")
    return f"{key}: {message}{shown}"
