"""Launching: accelerate profiles, where each process puts its model, and the pre-flight checks.

A run is one process (``qlora-kit train``) or several started by ``accelerate launch`` (DDP, FSDP, DeepSpeed). The
distributed mode is read from the environment accelerate sets for its workers, or from the profile about to be
launched, and every check here runs before any weight is loaded, so a wrong setting costs seconds, not a model load
on eight GPUs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from qlora_kit import tracking
from qlora_kit.errors import UserError
from qlora_kit.model import model_config_problems
from qlora_kit.recipe import Recipe, training_args
from qlora_kit.resolve import (
    Launch,
    Machine,
    Resolved,
    dtype_name,
    keeps_examples_apart,
    launch_from_env,
    resolve,
    this_machine,
)

PROFILE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
LAUNCHED_ENV = "QLORA_KIT_LAUNCHED"  # set by `qlora-kit train --accelerate-profile` in the processes it starts
REPORTERS = {
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
    "tensorboard": "tensorboard",
    "comet_ml": "comet_ml",
}


# ---------------------------------------------------------------------------------------------------------------
# Distributed mode: from the environment of a launched worker, or from a profile before launching.


def launch_from_profile(profile: dict[str, Any], name: str, processes: int | None = None) -> Launch:
    """The mode a profile will launch, with ``processes`` overriding its num_processes."""
    world = processes or int(profile.get("num_processes", 1))
    kind = str(profile.get("distributed_type", "NO")).upper()
    source, machines = f"profile {name}", int(profile.get("num_machines") or 1)
    if kind == "FSDP":
        version = int((profile.get("fsdp_config") or {}).get("fsdp_version", 1))  # accelerate's default is 1
        return Launch("fsdp", world, source=source, fsdp_version=version, machines=machines)
    if kind == "DEEPSPEED":
        stage = (profile.get("deepspeed_config") or {}).get("zero_stage")
        return Launch("deepspeed", world, int(stage) if stage is not None else None, source, machines=machines)
    if kind.startswith("MULTI_") or world > 1:
        return Launch("ddp", world, source=source, machines=machines)
    return Launch(source=source)


def is_launched(env: dict[str, str] | None = None) -> bool:
    """Whether this process was started by accelerate launch or torchrun (so it must not launch again)."""
    env = os.environ if env is None else env
    return any(key in env for key in (LAUNCHED_ENV, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"))


def is_main_process(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return int(env.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------------------------
# Profiles


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def resolve_profile(choice: str) -> Path:
    """A profile shipped in recipes/accelerate by name, or an accelerate config file by path."""
    if (PROFILE_DIR / f"{choice}.yaml").is_file():
        return PROFILE_DIR / f"{choice}.yaml"
    path = Path(choice).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    raise UserError(
        f"launch.accelerate_profile: unknown profile {choice!r}: use one of {', '.join(shipped_profiles())}, or a "
        "path to an accelerate config .yaml"
    )


def load_profile(path: Path) -> dict[str, Any]:
    """Read an accelerate config with accelerate's own loader, so a profile that accelerate rejects fails here."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        load_config_from_file(str(path))
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"accelerate profile {path} is not a valid accelerate config: {exc}") from None
    return yaml.safe_load(path.read_text())


def launch_processes(profile: dict[str, Any], machine: Machine) -> int | None:
    """Processes to start on this machine: one per visible GPU for a single-machine multi-GPU profile."""
    multi = str(profile.get("distributed_type", "NO")).upper() != "NO"
    if multi and machine.cuda_devices > 0 and int(profile.get("num_machines", 1)) == 1:
        return machine.cuda_devices
    return None


def relaunch_command(
    profile_path: Path, argv: list[str], processes: int | None, mixed_precision: str | None = None
) -> list[str]:
    """The `accelerate launch` command that runs this same `qlora-kit` command line under the profile."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(profile_path)]
    if processes:
        command += ["--num_processes", str(processes)]
    if mixed_precision:
        command += ["--mixed_precision", mixed_precision]
    return [*command, "-m", "qlora_kit", *argv]


def mixed_precision(resolved: Resolved) -> str:
    """accelerate's name for the precision the recipe trains in (DeepSpeed's config must agree with the trainer's)."""
    return "bf16" if resolved.bf16 else "fp16" if resolved.fp16 else "no"


def launch_profile(recipe: Recipe, argv: list[str]) -> int | None:
    """Run this command under the recipe's accelerate profile; return the launch's exit status.

    Returns None when this process is itself a launched worker: it then only checks that it runs the profile's mode.
    """
    import signal
    import subprocess

    path = resolve_profile(recipe.launch.accelerate_profile)
    profile = load_profile(path)
    if is_launched():
        check_profile_matches(profile, path.name, launch_from_env())
        return None
    machine = this_machine()
    processes = launch_processes(profile, machine)
    plan = launch_from_profile(profile, path.name, processes)
    resolved = preflight(recipe, plan, machine, profile)  # fail here, not in N workers
    # DeepSpeed's bf16/fp16 switches come from the launch and must equal the trainer's, which follow the recipe.
    precision = mixed_precision(resolved) if plan.mode == "deepspeed" else None
    env = {**os.environ, LAUNCHED_ENV: str(path)}
    child = subprocess.Popen(relaunch_command(path, argv, processes, precision), env=env)
    # SIGTERM (a scheduler stopping the job) goes on to the launcher, which passes it to every worker; SIGINT from a
    # terminal already reaches them all as one process group.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_profile_matches(profile: dict[str, Any], name: str, running: Launch) -> None:
    """A process launched by hand must run the mode the recipe's profile names, or the checks were for nothing."""
    planned = launch_from_profile(profile, name)
    if planned.mode != running.mode:
        raise UserError(
            f"launch.accelerate_profile: {name} is {planned.mode} but this process runs {running.mode} "
            f"({running.source}): launch with `accelerate launch --config_file {name} -m qlora_kit train ...`, or "
            "run `qlora-kit train` without accelerate launch and it will launch the profile itself"
        )


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight checks: each returns the problems it finds, every message says what to change.


def check_quant_storage(recipe: Recipe, resolved: Resolved) -> list[str]:
    """FSDP and ZeRO-3 shard 4-bit and ordinary weights alike, which needs one floating storage dtype for all."""
    quant, plan = recipe.quantization, resolved.launch
    if not (plan.sharded and quant.load_in_4bit):
        return []
    mode = "FSDP" if plan.mode == "fsdp" else "DeepSpeed ZeRO-3"
    compute = dtype_name(resolved.compute_dtype)
    problems = []
    if quant.bnb_4bit_quant_storage != compute:
        integer = (
            f", an integer dtype that {mode} cannot flatten or shard"
            if quant.bnb_4bit_quant_storage == "uint8"
            else ""
        )
        problems.append(
            f"quantization.bnb_4bit_quant_storage: {mode} ({plan.source}) shards the packed 4-bit weights together "
            f"with the other weights, so their storage dtype must be the compute dtype: set it to {compute} "
            f"(it is {quant.bnb_4bit_quant_storage}{integer})"
        )
    weights = dtype_name(resolved.weights_dtype)
    if weights != compute:
        problems.append(
            f"model.dtype: {mode} needs the unquantized weights in the compute dtype: set it to {compute} "
            f"or auto (it is {weights})"
        )
    return problems


def check_8bit_sharding(recipe: Recipe, plan: Launch) -> list[str]:
    """bitsandbytes' 8-bit weights (int8 with per-row scales kept beside them) cannot be sharded by FSDP."""
    if plan.mode != "fsdp" or not recipe.quantization.load_in_8bit:
        return []
    return [
        f"quantization.load_in_8bit: FSDP ({plan.source}) cannot shard bitsandbytes' 8-bit weights (int8, with "
        "their scales outside the tensor): set quantization.load_in_8bit: false and load_in_4bit: true with "
        "bnb_4bit_quant_storage equal to the compute dtype, or use the ddp profile"
    ]


def check_bf16(recipe: Recipe, machine: Machine) -> list[str]:
    asked = [
        key
        for key, on in (
            ("quantization.bnb_4bit_compute_dtype", recipe.quantization.bnb_4bit_compute_dtype == "bfloat16"),
            ("model.dtype", recipe.model.dtype == "bfloat16"),
            ("training.bf16", bool(recipe.training.get("bf16"))),
        )
        if on
    ]
    if not asked or machine.bf16_supported:
        return []
    return [
        f"{key}: bfloat16 was asked but {machine.name} has no native bfloat16 (compute capability 8.0 or newer): "
        "use float16 (and training.fp16: "
        "true) or float32"
        for key in asked
    ]


def check_device_map(recipe: Recipe, plan: Launch) -> list[str]:
    spread = recipe.launch.device_map
    if spread == "per_process" or plan.mode == "single":
        return []
    return [
        f"launch.device_map: {spread} spreads one model over every GPU, but this run has {plan.world_size} processes "
        f"({plan.mode}, {plan.source}) that each need their own copy: remove launch.device_map (each process then "
        "loads the model onto its own GPU), or launch one process; for a model too big for one GPU use the "
        "fsdp_qlora or zero3 profile"
    ]


def check_idle_gpus(recipe: Recipe, plan: Launch, machine: Machine) -> list[str]:
    if machine.cuda_devices < 2 or plan.world_size > 1 or recipe.launch.device_map != "per_process":
        return []
    return [
        f"launch: {machine.cuda_devices} GPUs are visible but this is one process, so {machine.cuda_devices - 1} "
        "would sit idle: add --accelerate-profile ddp (one process per GPU), or set CUDA_VISIBLE_DEVICES to one GPU, "
        "or set launch.device_map: auto to spread one model over them"
    ]


def check_packing(recipe: Recipe, resolved: Resolved) -> list[str]:
    """Packed examples must not attend to each other: bfd packing plus a kernel that reads sequence boundaries.

    Only packing the recipe asks for is checked; the default switches itself off where it would not be safe.
    """
    args = training_args(recipe)
    if resolved.packing and args.get("packing_strategy", "bfd") == "wrapped":
        return [
            "training.packing_strategy: 'wrapped' cuts examples and lets them attend to each other: use bfd, "
            "which keeps examples whole and marks their boundaries"
        ]
    if not (recipe.training.get("packing") or args.get("padding_free")):
        return []
    if not keeps_examples_apart(recipe, resolved.attn_implementation):
        return [
            f"model.attn_implementation: {resolved.attn_implementation} with this model's attention code cannot tell "
            "packed examples apart, so they would attend to each other: use flash_attention_2, or set "
            "training.packing: false"
        ]
    return []


def check_sharding_runs_here(plan: Launch, machine: Machine) -> list[str]:
    """FSDP2 shards on CPU processes too (torch's fully_shard over gloo), and so does DeepSpeed ZeRO-3 through its
    CPU accelerator; FSDP1 and a missing DeepSpeed would fail in every worker with a raw traceback, so they are
    refused here with what to run instead."""
    if plan.mode == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return [
            f"launch.accelerate_profile: {plan.source} uses DeepSpeed, which is not installed: pip install deepspeed "
            "(on a machine without GPUs it runs on its CPU accelerator), or use the fsdp_qlora profile"
        ]
    if plan.mode == "deepspeed" and not machine.on_gpu and shutil.which(os.environ.get("CXX", "c++")) is None:
        return [
            f"launch.accelerate_profile: {plan.source} uses DeepSpeed, whose CPU accelerator compiles its "
            "shared-memory communication op on first use, and no C++ compiler is on PATH: install one (apt-get "
            "install g++, or set CXX), or use the fsdp_qlora profile"
        ]
    if plan.mode == "fsdp" and plan.fsdp_version != 2 and not machine.on_gpu:
        return [
            f"launch.accelerate_profile: {plan.source} is FSDP version {plan.fsdp_version}, which accelerate runs on "
            "GPUs only: set fsdp_config.fsdp_version: 2 in the profile (the shipped fsdp_qlora profile runs on CPU "
            "processes over gloo), or run on a GPU machine"
        ]
    return []


def check_deepspeed_precision(resolved: Resolved, env: dict[str, str] | None = None) -> list[str]:
    """Under DeepSpeed the launch's mixed_precision becomes the engine's bf16/fp16 switch, which transformers
    requires to equal the trainer's (from the recipe's compute dtype); a worker launched by hand is checked here."""
    env = os.environ if env is None else env
    launched = env.get("ACCELERATE_MIXED_PRECISION")
    wanted = mixed_precision(resolved)
    if resolved.launch.mode != "deepspeed" or launched is None or launched == wanted:
        return []
    return [
        f"launch.accelerate_profile: DeepSpeed was launched with mixed_precision {launched} but the recipe trains in "
        f"{dtype_name(resolved.compute_dtype)}: launch with --mixed_precision {wanted} (qlora-kit train "
        "--accelerate-profile passes it itself)"
    ]


def check_processes_fit(plan: Launch, machine: Machine) -> list[str]:
    """One process per GPU: more processes than GPUs on a machine would put two ranks on one device."""
    local = plan.local_processes
    if not machine.on_gpu or plan.mode == "single" or local <= machine.cuda_devices:
        return []
    over = f" over {plan.machines} machines" if plan.machines > 1 else ""
    return [
        f"launch.accelerate_profile: {plan.source} starts {local} processes on this machine ({plan.world_size}"
        f"{over}) but it has {machine.cuda_devices} GPUs, so ranks would share one: set num_processes to "
        f"{machine.cuda_devices * plan.machines} (one per GPU{over}), or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
    ]


RENDEZVOUS = ("main_process_ip", "main_process_port", "machine_rank")


def check_rendezvous(profile: dict[str, Any] | None, plan: Launch) -> list[str]:
    """A profile over several machines must say where they meet and which one this is."""
    if profile is None or plan.machines < 2:
        return []
    missing = [key for key in RENDEZVOUS if profile.get(key) in (None, "")]
    rank = profile.get("machine_rank")
    problems = []
    if missing:
        problems.append(
            f"launch.accelerate_profile: {plan.source} runs on {plan.machines} machines but sets no "
            f"{', '.join(missing)}: in a copy of the profile set main_process_ip to machine 0's address, "
            f"main_process_port to a port open between them (29500), and machine_rank to this machine's number "
            f"(0 to {plan.machines - 1}), then pass the copy's path"
        )
    elif not (isinstance(rank, int) and 0 <= rank < plan.machines):
        problems.append(
            f"launch.accelerate_profile: {plan.source} has machine_rank {rank!r}: set it to this machine's number, "
            f"0 to {plan.machines - 1}"
        )
    return problems


def fsdp_on_cpu(mixed_precision: str) -> bool:
    """Make accelerate's state FSDP in a launched CPU worker; return whether it had to.

    accelerate only sets up FSDP on accelerators: with gloo on CPU, AcceleratorState stays MULTI_CPU even when
    ACCELERATE_USE_FSDP=true, and prepare() would wrap the model in DDP. torch's fully_shard runs on CPU over gloo, so
    the state is created here first, the way Accelerator() creates it (same environment, the trainer's
    ``mixed_precision``), then switched to FSDP with the plugin accelerate itself builds from the FSDP_* variables;
    the Accelerator the trainer creates next finds it initialized and keeps it. Call after the process group exists
    (TrainingArguments sets it up) and before the trainer creates its Accelerator.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    if launch_from_env().mode != "fsdp" or PartialState().distributed_type != DistributedType.MULTI_CPU:
        return False
    state = AcceleratorState(
        mixed_precision=mixed_precision, cpu=True, dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True
    )
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does on GPUs
    return True


def check_reporters(recipe: Recipe) -> list[str]:
    names = tracking.reporters(recipe)
    missing = [name for name in names if name in REPORTERS and importlib.util.find_spec(REPORTERS[name]) is None]
    return [_not_installed(name) for name in missing]


def _not_installed(name: str) -> str:
    fix = {
        "mlflow": "pip install 'qlora-kit[tracking]' (MLflow's local store, no server)",
        "trackio": "pip install 'qlora-kit[tracking]' (trackio's local store, no server)",
    }.get(name, f"pip install {name}")
    return f"training.report_to: {name} is not installed: {fix}, or remove it (tensorboard works offline)"


def preflight(
    recipe: Recipe, plan: Launch | None = None, machine: Machine | None = None, profile: dict[str, Any] | None = None
) -> Resolved:
    """Every check that needs no weights; raise one UserError listing all problems found, else return the settings
    the run will use on ``machine`` under ``plan`` (from ``profile``, the accelerate config about to be launched)."""
    resolved = resolve(recipe, machine, plan)
    plan, machine = resolved.launch, resolved.machine
    problems = [
        *check_quant_storage(recipe, resolved),
        *check_8bit_sharding(recipe, plan),
        *check_bf16(recipe, machine),
        *check_device_map(recipe, plan),
        *check_idle_gpus(recipe, plan, machine),
        *check_packing(recipe, resolved),
        *check_sharding_runs_here(plan, machine),
        *check_deepspeed_precision(resolved),
        *check_processes_fit(plan, machine),
        *check_rendezvous(profile, plan),
        *check_reporters(recipe),
        *model_config_problems(recipe),
    ]
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "a problem"
        raise UserError(f"pre-flight check found {count}: " + "; ".join(problems))
    return resolved
