"""What the recipe means on this machine: every ``auto`` decided once, from the recipe, the machine and the launch.

The recipe says what the user asked; ``Machine`` says what the hardware offers (detected once, or handed in by a test
as a T4, an A100 or eight H100s); ``Launch`` says how the processes are distributed. ``resolve`` turns the three into
one frozen ``Resolved``: compute and storage dtypes, attention kernel, device map, packing, optimizer and precision
flags. Pre-flight, plan, train, eval, merge and bench read these answers instead of probing ``torch.cuda`` each on
their own, and the run's recipe.yaml records them as they were used.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from qlora_kit.recipe import Recipe, training_args

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
Mode = Literal["single", "ddp", "fsdp", "deepspeed"]


# ---------------------------------------------------------------------------------------------------------------
# The machine


@dataclass(frozen=True)
class Machine:
    """What this machine offers: visible CUDA devices, their compute capability and memory, flash-attn."""

    cuda_devices: int = 0
    name: str = "cpu"
    capability: tuple[int, int] | None = None  # CUDA compute capability of device 0
    memory_bytes: int | None = None  # memory of one GPU
    flash_attn: bool = False

    @property
    def on_gpu(self) -> bool:
        return self.cuda_devices > 0

    @property
    def bf16_native(self) -> bool:
        """bf16 in hardware: Ampere (8.0) or newer. torch.cuda.is_bf16_supported() also says yes on a T4 or V100,
        which only emulate it, slowly; those are not native."""
        return self.on_gpu and self.capability is not None and self.capability >= (8, 0)

    @property
    def bf16_supported(self) -> bool:
        """Whether an explicit bf16 request can run at all: on every CPU (torch), on GPUs only natively."""
        return not self.on_gpu or self.bf16_native


@functools.cache
def this_machine() -> Machine:
    """The machine this process runs on, probed once."""
    if not torch.cuda.is_available():
        return Machine()
    props = torch.cuda.get_device_properties(0)
    return Machine(
        cuda_devices=torch.cuda.device_count(),
        name=props.name,
        capability=(props.major, props.minor),
        memory_bytes=int(props.total_memory),
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
    )


# ---------------------------------------------------------------------------------------------------------------
# The launch


@dataclass(frozen=True)
class Launch:
    """How the run is (or is about to be) distributed over processes."""

    mode: Mode = "single"
    world_size: int = 1
    zero_stage: int | None = None
    source: str = "one process"
    fsdp_version: int | None = None  # 1 (flat parameters) or 2 (per-parameter sharding, fully_shard) under FSDP
    machines: int = 1

    @property
    def local_processes(self) -> int:
        """Processes on each machine (the world split evenly over the machines, as accelerate launches it)."""
        return -(-self.world_size // max(self.machines, 1))

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded across processes (FSDP, or DeepSpeed ZeRO-3)."""
        return self.mode == "fsdp" or (self.mode == "deepspeed" and self.zero_stage == 3)


def _flag(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").lower() in ("1", "true", "yes")


def launch_from_env(env: dict[str, str] | None = None) -> Launch:
    """The mode accelerate/torchrun set up for this process (accelerate exports ACCELERATE_USE_FSDP and friends)."""
    env = dict(os.environ if env is None else env)
    world = int(env.get("WORLD_SIZE", "1"))
    machines = max(world // int(env.get("LOCAL_WORLD_SIZE") or world), 1)
    if _flag(env, "ACCELERATE_USE_FSDP"):
        version = int(env.get("FSDP_VERSION", "1"))  # accelerate's default when the config names none
        return Launch("fsdp", world, source="ACCELERATE_USE_FSDP=true", fsdp_version=version, machines=machines)
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]) if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") else None
        return Launch("deepspeed", world, stage, source="ACCELERATE_USE_DEEPSPEED=true", machines=machines)
    if world > 1:
        return Launch("ddp", world, source=f"WORLD_SIZE={world}", machines=machines)
    return Launch()


# ---------------------------------------------------------------------------------------------------------------
# The decisions


@dataclass(frozen=True)
class Resolved:
    """Every setting that depends on the machine or the launch, decided once."""

    compute_dtype: torch.dtype
    weights_dtype: torch.dtype
    quant_storage: torch.dtype
    attn_implementation: str
    device_map: Any
    packing: bool
    optim: str
    bf16: bool
    fp16: bool
    use_cpu: bool
    machine: Machine = field(default_factory=Machine)
    launch: Launch = field(default_factory=Launch)
    memory: MemorySwitches = field(default_factory=lambda: MemorySwitches())

    @property
    def packed_layout(self) -> PackedLayout | None:
        """How packed batches are laid out for this kernel (see packed_layout), or None without packing."""
        return packed_layout(self.attn_implementation) if self.packing else None

    def recipe_fields(self) -> dict[str, dict[str, Any]]:
        """The recipe keys whose ``auto`` (or machine default) this resolution decided, as recipe.yaml records them."""
        return {
            "quantization": {"bnb_4bit_compute_dtype": dtype_name(self.compute_dtype)},
            "model": {"attn_implementation": self.attn_implementation},
            "training": {"packing": self.packing, "optim": self.optim, "bf16": self.bf16, "fp16": self.fp16},
        }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve(recipe: Recipe, machine: Machine | None = None, launch: Launch | None = None) -> Resolved:
    """Decide every machine-dependent setting of ``recipe`` for ``machine`` and ``launch`` (default: this process)."""
    machine = machine or this_machine()
    launch = launch or launch_from_env()
    compute = compute_dtype(recipe, machine)
    kernel = attention_kernel(recipe, machine, compute)
    args = training_args(recipe)
    return Resolved(
        compute_dtype=compute,
        weights_dtype=compute if recipe.model.dtype == "auto" else DTYPES[recipe.model.dtype],
        quant_storage=DTYPES[recipe.quantization.bnb_4bit_quant_storage],
        attn_implementation=kernel,
        device_map=device_map(recipe, machine, launch),
        packing=packs(recipe, kernel),
        optim=str(args.get("optim") or ("paged_adamw_8bit" if machine.on_gpu else "adamw_torch")),
        bf16=bool(args.get("bf16", compute == torch.bfloat16)),
        fp16=bool(args.get("fp16", compute == torch.float16)),
        use_cpu=bool(args.get("use_cpu", not machine.on_gpu)),
        machine=machine,
        launch=launch,
        memory=memory_switches(recipe),
    )


def compute_dtype(recipe: Recipe, machine: Machine) -> torch.dtype:
    """The matmul dtype: the recipe's, or bf16 where the GPU has it natively, else float32.

    auto never picks float16: its narrow range overflows in long runs. A T4 or V100 therefore computes in float32
    unless the recipe asks for float16 (see docs/troubleshooting.md).
    """
    name = recipe.quantization.bnb_4bit_compute_dtype
    if name == "auto":
        return torch.bfloat16 if machine.bf16_native else torch.float32
    return DTYPES[name]


def attention_kernel(recipe: Recipe, machine: Machine, compute: torch.dtype) -> str:
    """The recipe's kernel; for auto, flash-attention 2 where it runs (an Ampere or newer GPU, the flash-attn package,
    16-bit compute: it reads packed sequence boundaries itself), else PyTorch's sdpa."""
    requested = recipe.model.attn_implementation
    if requested != "auto":
        return requested
    flash_runs = machine.bf16_native and machine.flash_attn and compute in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if flash_runs else "sdpa"


def device_map(recipe: Recipe, machine: Machine, launch: Launch) -> dict[str, Any] | str | None:
    """Where this process loads the model.

    FSDP and ZeRO-3 shard the model themselves, so from_pretrained gets no device_map (bitsandbytes then quantizes
    onto this process's current CUDA device). DDP and single-device runs put the whole model on this process's own
    device; 'auto' and friends spread one model over every visible GPU, for one process only.
    """
    if launch.sharded:
        return None
    if recipe.launch.device_map != "per_process":
        return recipe.launch.device_map
    if machine.on_gpu:
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def packs(recipe: Recipe, kernel: str) -> bool:
    """Whether training packs: the recipe's training.packing when set, else on wherever the model's attention keeps
    packed examples apart (every model whose code uses transformers' masking utils, or a flash-attention kernel)."""
    if "packing" in recipe.training:
        return bool(recipe.training["packing"])
    return bool(training_args(recipe).get("packing")) and keeps_examples_apart(recipe, kernel)


# Kernels that read sequence boundaries themselves (cu_seq_lens, derived by transformers from position_ids).
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")
PackedLayout = Literal["one-row", "separate-rows"]


def packed_layout(kernel: str) -> PackedLayout:
    """How a packed batch reaches the attention kernel, the fastest layout that keeps examples apart for each kernel.

    - flash-attention (varlen): the whole batch as one row, position ids restarting at each example (trl's
      padding-free collator). The kernel attends within each example from the boundaries alone: no mask is built,
      no padding is computed, and the cost is the sum of n_i^2 over the examples.
    - sdpa, eager, flex: each packed row in its own batch slot (qlora_kit.data.collate.PackedRowsCollator), position
      ids restarting at each example, no attention mask, so transformers' masking utils build a per-row
      block-diagonal causal mask. One concatenated row would give sdpa one dense (rows x length)^2 mask: rows times
      the scores of separate rows (8x at batch 8), most of them masked out but still computed.
    See docs/benchmarking.md (packed training step) for the measurements.
    """
    return "one-row" if kernel in VARLEN_KERNELS else "separate-rows"


def keeps_examples_apart(recipe: Recipe, kernel: str) -> bool:
    return kernel.startswith("flash_attention") or masks_packed_sequences(recipe)


def masks_packed_sequences(recipe: Recipe) -> bool:
    """Whether the model's code builds its mask with transformers' masking utils, which split packed sequences.

    Only the config is read (no weights): the model class comes from the config, and masking_utils'
    create_causal_mask derives per-example blocks from position_ids when no attention mask is passed.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(
            recipe.model.name_or_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):
        return False
    module = sys.modules[model_class.__module__]
    return any(hasattr(module, name) for name in ("create_causal_mask", "create_sliding_window_causal_mask"))


# ---------------------------------------------------------------------------------------------------------------
# The long-context memory switches: trl's and transformers' own, read once under their own names.

# Keys of activation_checkpointing_kwargs (alias gradient_checkpointing_kwargs): transformers' every_n_layers and
# offload, trl's selective, and the keywords torch.utils.checkpoint.checkpoint takes.
CHECKPOINT_KEYS = (
    "use_reentrant",
    "every_n_layers",
    "offload",
    "selective",
    "preserve_rng_state",
    "determinism_check",
)


@dataclass(frozen=True)
class MemorySwitches:
    """How a training step keeps (or does not keep) what backward needs; each switch is a trl or transformers field.

    checkpointing          activation_checkpointing (transformers 5; gradient_checkpointing is its deprecated alias)
    use_reentrant          activation_checkpointing_kwargs.use_reentrant (torch's checkpoint)
    every_n_layers         activation_checkpointing_kwargs.every_n_layers (transformers: checkpoint every n-th layer)
    offload_checkpoints    activation_checkpointing_kwargs.offload (transformers: checkpointed inputs in host memory)
    selective              activation_checkpointing_kwargs.selective (trl: keep attention outputs, recompute the rest)
    activation_offloading  trl's SFTConfig field: every saved activation goes to host memory
    liger                  use_liger_kernel (Liger's RMSNorm, SwiGLU and RoPE kernels; trl refuses its fused loss)
    full_logits            trl computes the loss in chunks without the logits, unless label smoothing needs them
    """

    checkpointing: bool = True
    use_reentrant: bool = False
    every_n_layers: int = 1
    offload_checkpoints: bool = False
    selective: bool = False
    activation_offloading: bool = False
    liger: bool = False
    full_logits: bool = False
    kwargs: tuple[tuple[str, Any], ...] = ()  # the checkpointing kwargs as given, for the pre-flight check
    kwargs_key: str = "activation_checkpointing_kwargs"  # or its alias, when that is what the recipe wrote

    @property
    def offloaded(self) -> bool:
        return self.activation_offloading or (self.checkpointing and self.offload_checkpoints)


def checkpointing_args(args: dict[str, Any]) -> tuple[bool, dict[str, Any], str]:
    """Whether checkpointing is on, its kwargs and the key they came from, reading transformers' new names before
    their deprecated aliases (as TrainingArguments does: the new name wins when it is set)."""
    enabled = args.get("activation_checkpointing")
    if enabled is None:
        enabled = args.get("gradient_checkpointing", False)
    key = "activation_checkpointing_kwargs"
    if args.get(key) is None:
        key = "gradient_checkpointing_kwargs"
    kwargs = args.get(key)
    return bool(enabled), dict(kwargs) if isinstance(kwargs, dict) else {}, key


def memory_switches(recipe: Recipe) -> MemorySwitches:
    """The recipe's long-context switches, with qlora-kit's defaults (non-reentrant checkpointing on)."""
    args = training_args(recipe)
    enabled, kwargs, key = checkpointing_args(args)
    every = kwargs.get("every_n_layers", 1)
    return MemorySwitches(
        checkpointing=enabled,
        use_reentrant=bool(kwargs.get("use_reentrant", False)),
        every_n_layers=every if isinstance(every, int) and every >= 1 else 1,
        offload_checkpoints=bool(kwargs.get("offload", False)),
        selective=bool(kwargs.get("selective", False)),
        activation_offloading=bool(args.get("activation_offloading", False)),
        liger=bool(args.get("use_liger_kernel", False)),
        full_logits=float(args.get("label_smoothing_factor") or 0) > 0,
        kwargs=tuple(sorted(kwargs.items(), key=lambda item: item[0])),
        kwargs_key=key,
    )


def memory_switch_problems(recipe: Recipe, machine: Machine, liger_types: frozenset[str] | None = None) -> list[str]:
    """What cannot run here among the memory switches, each with the fix. ``liger_types`` are the model types Liger
    patches (read from the installed package; None when it is not installed)."""
    switches = memory_switches(recipe)
    problems = checkpoint_kwarg_problems(switches)
    if switches.activation_offloading and not machine.on_gpu:
        problems.append(
            "training.activation_offloading: trl moves activations from the GPU to host memory, and this machine "
            f"({machine.name}) has no GPU (trl fails at the first step): remove it here, or train on a GPU machine"
        )
    if switches.checkpointing and switches.offload_checkpoints and not machine.on_gpu:
        problems.append(
            f"training.{switches.kwargs_key}.offload: transformers keeps the checkpointed inputs in pinned "
            f"host memory, which needs a GPU; {machine.name} has none (torch refuses pinned memory): remove it here, "
            "or train on a GPU machine"
        )
    return problems + liger_problems(recipe, machine, switches, liger_types)


def checkpoint_kwarg_problems(switches: MemorySwitches) -> list[str]:
    import difflib

    kwargs = dict(switches.kwargs)
    key = f"training.{switches.kwargs_key}"
    problems = []
    for name in kwargs:
        if name not in CHECKPOINT_KEYS:
            close = difflib.get_close_matches(name, CHECKPOINT_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{key}.{name}: not a checkpointing option{hint}: use {', '.join(CHECKPOINT_KEYS)}")
    every = kwargs.get("every_n_layers", 1)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        problems.append(f"{key}.every_n_layers: must be a whole number of layers, 1 or more (got {every!r})")
    if switches.selective and not switches.checkpointing:
        problems.append(
            f"{key}.selective: trl's selective checkpointing refines checkpointing, which is off: set "
            "training.activation_checkpointing: true, or remove selective"
        )
    if switches.selective and switches.use_reentrant:
        problems.append(
            f"{key}.selective: trl's selective checkpointing needs non-reentrant checkpointing: set use_reentrant: "
            "false, or remove selective"
        )
    return problems


def liger_problems(
    recipe: Recipe, machine: Machine, switches: MemorySwitches, liger_types: frozenset[str] | None
) -> list[str]:
    if not switches.liger:
        return []
    if not machine.on_gpu:
        return [
            "training.use_liger_kernel: Liger's kernels are Triton kernels for CUDA GPUs and this machine "
            f"({machine.name}) has none: remove it here (trl already computes the loss in chunks without the "
            "logits), or train on a GPU machine"
        ]
    if liger_types is None:
        return [
            "training.use_liger_kernel: the Liger kernels are not installed: pip install 'qlora-kit[liger]' on "
            "this GPU machine, or remove the key"
        ]
    problems = []
    config = dict(training_args(recipe).get("liger_kernel_config") or {})
    if config.get("fused_linear_cross_entropy"):
        problems.append(
            "training.liger_kernel_config.fused_linear_cross_entropy: trl's SFTTrainer refuses it (it replaces the "
            "forward that trl's own chunked loss patches, which already never builds the logits): remove it"
        )
    model_type = model_type_of(recipe)
    if model_type is not None and model_type not in liger_types:
        problems.append(
            f"training.use_liger_kernel: Liger has no kernels for {model_type} models (it patches "
            f"{', '.join(sorted(liger_types))}), so nothing would change: remove it"
        )
    return problems


def model_type_of(recipe: Recipe) -> str | None:
    """The model's config model_type, read without weights (None when the config is not on this machine)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            recipe.model.name_or_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except (OSError, ValueError, KeyError):
        return None
    return getattr(config, "model_type", None)


def installed_liger_types() -> frozenset[str] | None:
    """The model types the installed Liger package patches, or None when it is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)
