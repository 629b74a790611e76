"""qlora-kit beside LLaMA-Factory, axolotl and a plain trl script: the same QLoRA job, interleaved, one table.

    python benchmarks/peers.py                          # install the peers (first time), 3 rounds, packing on
    python benchmarks/peers.py --rounds 3 --threads 2 --no-packing
    python benchmarks/peers.py --install-only           # just build the peers' virtual environments
    python benchmarks/peers.py --device cpu --tools qlora-kit trl --rounds 1 --steps 8 --skip-steps 2

The job comes from a qlora-kit recipe (default recipes/demo.yaml: the demo model in 4-bit NF4 with double
quantization, LoRA on all linear layers, the demo chat data) plus --steps, --packing and the thread count, and is
translated into each peer's own configuration (written under --workdir, kept for reading): model, 4-bit settings,
LoRA rank/alpha/dropout/targets, data, max length, batch, learning rate, schedule and warm-up, steps, seed, packing
(LLaMA-Factory: packing + neat_packing; axolotl: sample_packing; trl: packing, its padding-free best-fit-decreasing
default). Every tool keeps packed examples from attending to each other.

--device (default: cuda when torch sees a GPU, else cpu) puts every tool on that device. On cpu no GPU is visible
to any tool (CUDA_VISIBLE_DEVICES is emptied) and the configurations are those the recorded CPU figures were taken
with. On cuda every tool runs on the GPU with the compute dtype and the optimizer qlora-kit's recipe resolves to
there (``auto``: bf16 on an Ampere or newer GPU, else float32; paged 8-bit AdamW): LLaMA-Factory and axolotl get
``bf16`` and the optimizer in their configurations, the trl script its 4-bit compute dtype, weights dtype, ``bf16``
and ``optim``; LLaMA-Factory and the trl script also get gradient checkpointing turned off, as the recipe and every
other tool have it (on cpu they keep their default, on). The peers attend with sdpa on both devices; qlora-kit takes
the kernel its recipe resolves to (sdpa, or flash-attention where the package is installed) and lays packed rows out
for it (qlora_kit.resolve.packed_layout). The table then adds each tool's peak GPU memory.

Each peer lives in its own virtual environment under --cache-dir (default ~/.cache/qlora-kit-peers), built with pip
from PyPI the first time a run asks for it with --tools: `torch==2.13.0` first (the local CPU wheel on a machine
without a GPU), then `llamafactory` / `axolotl` with pip's own resolution of their pinned dependencies. qlora-kit and
the plain trl script run in this Python (the project's environment) and need no install. A peer that cannot be
installed (no route to PyPI, say) or whose training entry point does not import is left out of the run, named with
its one-line reason (peers.json's ``left_out``).

Measured the same way for every tool: the folder benchmarks/peers_hook holds a ``sitecustomize`` that wraps
transformers' ``Trainer.training_step`` in each tool's process (every tool trains through a transformers Trainer) to
count each batch's input tokens (real tokens the model reads, padding excluded) and trained tokens (positions with a
label after the shift) and its loss, and stamps the end of each optimizer step. Wall time and peak RSS come from the
parent (``os.wait4`` of the child), peak GPU memory (cuda) from ``torch.cuda.max_memory_allocated`` in the child;
time to first step is from spawning the process to the end of step 1; throughput is over the steps after
--skip-steps (default 5). The held-out loss is computed afterwards by one script for every tool's saved adapter
(qlora-kit's 4-bit loader, peft, the recipe's eval data rendered by qlora-kit's pipeline with assistant-only labels),
on the tools' device. Rounds interleave the tools (qlora-kit, LLaMA-Factory, axolotl, trl, then again); the table
shows the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
HOOK = REPO / "benchmarks" / "peers_hook"
TORCH = "torch==2.13.0"  # the project's torch; on a machine without a GPU pip's find-links gives the CPU wheel
PEERS = {"llamafactory": ["llamafactory", "bitsandbytes"], "axolotl": ["axolotl"]}
# LLaMA-Factory imports torchaudio unconditionally, and PyPI has no torchaudio that loads beside the project's CPU
# torch (its 2.11 wheel is a CUDA build; 2.13 does not exist there). torch, torchvision and torchaudio 2.9.1 from
# PyPI are CUDA builds that match each other and run on the CPU, so LLaMA-Factory gets those; the qlora-kit@2.9
# tool runs qlora-kit on the same torch to show what the torch version alone changes.
PEER_TORCH = {
    "llamafactory": ["torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.1"],
    "axolotl": [TORCH],
    "qlora-kit-torch2.9": ["torch==2.9.1"],
}
# What each peer's training command imports first: a peer whose import fails is reported, with the error, not run.
ENTRY_MODULES = {"llamafactory": "llamafactory.train.tuner", "axolotl": "axolotl.cli.train"}
TOOLS = ("qlora-kit", "llamafactory", "axolotl", "trl", "qlora-kit-torch2.9")


@dataclass(frozen=True)
class Job:
    """The one training job every tool runs, read from a qlora-kit recipe."""

    model: str
    train: str
    eval: str
    max_length: int
    batch_size: int
    learning_rate: float
    scheduler: str
    warmup_steps: int
    steps: int
    seed: int
    r: int
    alpha: int
    dropout: float
    double_quant: bool
    packing: bool
    end_of_turn: str
    device: str = "cpu"  # "cuda": every tool trains on the GPU
    bf16: bool = False  # bf16 compute (cuda only, where the GPU has it natively: qlora-kit's `auto`)
    optim: str | None = None  # cuda: qlora-kit's optimizer there, for every tool; cpu: each tool's setting as before


def job_from_recipe(path: Path, steps: int, packing: bool, end_of_turn: str, device: str = "cpu") -> Job:
    from qlora_kit.recipe import load_recipe, training_args

    recipe = load_recipe(str(path))
    args = training_args(recipe)
    if recipe.lora.target_modules != "all-linear" or recipe.model.tokenizer_name_or_path:
        sys.exit("error: peers.py compares LoRA on all linear layers of a model folder with its own tokenizer")
    if len(recipe.data.train) != 1 or recipe.data.eval is None:
        sys.exit("error: peers.py needs a recipe with one train file and an eval file (data.train, data.eval)")
    return Job(
        model=str((REPO / recipe.model.name_or_path).resolve()),
        train=str((REPO / recipe.data.train[0].path).resolve()),
        eval=str((REPO / recipe.data.eval.path).resolve()),
        max_length=recipe.data.max_length,
        batch_size=args["per_device_train_batch_size"],
        learning_rate=args["learning_rate"],
        scheduler=args["lr_scheduler_type"],
        warmup_steps=min(args.get("warmup_steps") or 0, steps // 10),
        steps=steps,
        seed=args["seed"],
        r=recipe.lora.r,
        alpha=recipe.lora.lora_alpha,
        dropout=recipe.lora.lora_dropout,
        double_quant=recipe.quantization.bnb_4bit_use_double_quant,
        packing=packing,
        end_of_turn=end_of_turn,
        device=device,
        **(gpu_settings(recipe) if device == "cuda" else {}),
    )


def gpu_settings(recipe) -> dict:
    """The compute dtype and optimizer qlora-kit's recipe resolves to on this GPU, for every tool to use the same."""
    import torch

    from qlora_kit.resolve import resolve

    resolved = resolve(recipe)
    if resolved.compute_dtype == torch.float16:
        sys.exit("error: peers.py compares bf16 or float32 compute; set quantization.bnb_4bit_compute_dtype to auto")
    return {"bf16": resolved.compute_dtype == torch.bfloat16, "optim": resolved.optim}


# ---------------------------------------------------------------------------------------------------------------
# Installing the peers


def _project_requirements(venv: Path) -> tuple[list[str], Path]:
    """qlora-kit's own dependencies (without torch) and constraints.txt less its torch pin, for the torch-2.9 run."""
    import tomllib

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    constraints = venv / "constraints-without-torch.txt"
    lines = (REPO / "constraints.txt").read_text().splitlines()
    constraints.write_text("\n".join(line for line in lines if not line.startswith("torch==")) + "\n")
    return [d for d in dependencies if not d.startswith("torch")], constraints


class InstallError(Exception):
    """A peer's environment could not be built; the message is one line: the failing step's last error line."""


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise InstallError(lines[-1] if lines else f"{' '.join(command[:4])} ... exited {result.returncode}")


def install_one(cache: Path, name: str) -> float:
    """Build one peer's virtual environment unless already built; the seconds the install took (recorded beside it)."""
    torch_packages = PEER_TORCH[name]
    venv = cache / name
    stamp = venv / ".installed.json"
    if not stamp.is_file():
        print(f"installing {name} into {venv} ...", flush=True)
        started = time.perf_counter()
        _run([sys.executable, "-m", "venv", "--clear", str(venv)])
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        _run([*pip, *torch_packages])
        if name in PEERS:
            _run([*pip, torch_packages[0], *PEERS[name]])
        else:  # qlora-kit itself, run from this checkout (PYTHONPATH), on the peer's torch
            requirements, constraints = _project_requirements(venv)
            _run([*pip, "-c", str(constraints), torch_packages[0], *requirements])
        if torch_packages == [TORCH]:
            # PyPI's torchvision wheel (pulled in by axolotl's dependencies) is built against the CUDA torch: its
            # C++ ops fail to register against the CPU torch, and transformers then fails to import at all
            # ("operator torchvision::nms does not exist"); transformers only uses it when present.
            _run([*pip[:3], "uninstall", "-q", "-y", "torchvision"])
        freeze = subprocess.run([*pip[:3], "freeze"], capture_output=True, text=True, check=True).stdout
        stamp.write_text(json.dumps({"seconds": time.perf_counter() - started, "freeze": freeze}, indent=1))
    return json.loads(stamp.read_text())["seconds"]


def install(cache: Path, tools: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Build the environments of the asked-for tools that need one (qlora-kit and trl run in this Python).

    Returns the seconds each install took and, for a peer that could not be installed, the one-line reason."""
    times, failed = {}, {}
    for name in (tool for tool in tools if tool in PEER_TORCH):
        try:
            times[name] = install_one(cache, name)
        except InstallError as error:
            failed[name] = f"install failed: {error}"
            print(f"{name} could not be installed, left out: {error}", flush=True)
    return times, failed


def device_env(device: str) -> dict[str, str]:
    """What a tool's process is told about the device: on cpu no GPU is visible, on cuda what this process sees."""
    return {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}


def import_error(cache: Path, name: str, device: str = "cpu") -> str | None:
    """The error importing the peer's training entry point in its environment (last line), or None if it imports."""
    python = str(cache / name / "bin" / "python")
    env = {**os.environ, **device_env(device), "DISABLE_VERSION_CHECK": "1"}
    result = subprocess.run([python, "-c", f"import {ENTRY_MODULES[name]}"], capture_output=True, text=True, env=env)
    if result.returncode == 0:
        return None
    return result.stderr.strip().splitlines()[-1]


def peer_versions(cache: Path, tools: list[str]) -> dict[str, dict[str, str]]:
    """The main library versions in the environment of each peer that ran."""
    wanted = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "llamafactory", "axolotl")
    found = {}
    for name in (tool for tool in tools if tool in PEER_TORCH):
        lines = json.loads((cache / name / ".installed.json").read_text())["freeze"].splitlines()
        pins = dict(line.split("==", 1) for line in lines if "==" in line)
        found[name] = {k: pins[k] for k in wanted if k in pins}
    return found


# ---------------------------------------------------------------------------------------------------------------
# Each tool's configuration for the job


def llamafactory_config(job: Job, out: Path) -> list[str]:
    data_dir = out / "lf-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    info = {
        "demo": {
            "file_name": job.train,
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {**tags, "system_tag": "system"},
        }
    }
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=1))
    config = {
        "model_name_or_path": job.model,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "quantization_bit": 4,
        "quantization_method": "bnb",  # LLaMA-Factory 0.9.5 silently ignores the older name "bitsandbytes"
        "quantization_type": "nf4",
        "double_quantization": job.double_quant,
        "lora_rank": job.r,
        "lora_alpha": job.alpha,
        "lora_dropout": job.dropout,
        "lora_target": "all",
        "dataset": "demo",
        "dataset_dir": str(data_dir),
        "template": "chatml",  # the demo model's template: <|im_start|>role\ncontent<|im_end|>\n
        "cutoff_len": job.max_length,
        "packing": job.packing,
        "neat_packing": job.packing,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "overwrite_cache": True,
        "output_dir": str(out / "llamafactory-out"),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": job.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": job.learning_rate,
        "lr_scheduler_type": job.scheduler,
        "warmup_steps": job.warmup_steps,
        "max_steps": job.steps,
        "seed": job.seed,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        **llamafactory_device(job),
        "plot_loss": False,
        "disable_tqdm": True,
    }
    path = out / "llamafactory.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ["-m", "llamafactory.cli", "train", str(path)]


def llamafactory_device(job: Job) -> dict:
    """LLaMA-Factory 0.9.5's device keys. It takes the 4-bit compute dtype, the 4-bit storage dtype and the weights'
    dtype from ``bf16`` (hparams/parser.py: compute_dtype; model/model_utils/quantization.py). On the GPU it attends
    with sdpa like on CPU (its neat_packing under fa2 needs batch size 1: data/collator.py asserts it). Like every
    other tool, it runs without gradient checkpointing, which it turns on unless told
    (disable_gradient_checkpointing)."""
    if job.device == "cpu":
        return {"use_cpu": True, "bf16": False, "fp16": False, "disable_gradient_checkpointing": True}
    gpu = {"bf16": job.bf16, "fp16": False, "flash_attn": "sdpa", "optim": job.optim}
    return {**gpu, "disable_gradient_checkpointing": True}


# axolotl turns on its fused LoRA kernels by default. Off on CPU: they dequantize NF4 through CUDA streams only. Off
# on a GPU too: with LoRA dropout (this job's), axolotl 0.19's kernels (axolotl/kernels/lora.py) draw one dropout mask
# shared by q/k/v and one shared by gate/up, and none for down_proj's input, where peft's LoRA layers (every other
# tool's) draw a mask per layer: a different model would be trained.
AXOLOTL_KERNELS_OFF = {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}


def axolotl_config(job: Job, out: Path) -> list[str]:
    config = {
        "base_model": job.model,
        "load_in_4bit": True,
        "adapter": "qlora",
        "bnb_config_kwargs": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": job.double_quant},
        "lora_r": job.r,
        "lora_alpha": job.alpha,
        "lora_dropout": job.dropout,
        "lora_target_linear": True,
        **AXOLOTL_KERNELS_OFF,
        "datasets": [
            {
                "path": job.train,
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "roles_to_train": ["assistant"],
                "train_on_eot": "turn",
            }
        ],
        "chat_template": "tokenizer_default",
        # The demo tokenizer's EOS (<|endoftext|>) never appears in a ChatML render; the turn ends with <|im_end|>,
        # which qlora-kit trains (it is what makes the model stop). axolotl trains it only when named here.
        "eot_tokens": [job.end_of_turn],
        "dataset_prepared_path": str(out / "axolotl-prepared"),
        "val_set_size": 0,
        "sequence_len": job.max_length,
        "sample_packing": job.packing,
        "pad_to_sequence_len": job.packing,
        "micro_batch_size": job.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": job.steps,
        "num_epochs": 100,
        "learning_rate": job.learning_rate,
        "lr_scheduler": job.scheduler,
        "warmup_steps": job.warmup_steps,
        "optimizer": job.optim or "adamw_torch",
        "seed": job.seed,
        # With sample_packing, axolotl keeps packed examples apart under sdpa: its varlen path on a GPU in half
        # precision (torch >= 2.10), a block-diagonal mask otherwise (loaders/patch_manager.py).
        "sdp_attention": True,
        "flash_attention": False,
        "bf16": job.bf16,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": False,
        "logging_steps": 10,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "output_dir": str(out / "axolotl-out"),
    }
    path = out / "axolotl.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ["-m", "axolotl.cli.train", str(path)]


TRL_SCRIPT = '''\
"""The plain trl script a user writes for the job (generated by benchmarks/peers.py)."""
import json, sys
import datasets, torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

job = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(job["model"])
dtype = torch.bfloat16 if job["bf16"] else torch.float32
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                           bnb_4bit_use_double_quant=job["double_quant"])
model = AutoModelForCausalLM.from_pretrained(job["model"], quantization_config=quant, dtype=dtype)
lora = LoraConfig(r=job["r"], lora_alpha=job["alpha"], lora_dropout=job["dropout"], target_modules="all-linear",
                  task_type="CAUSAL_LM")
# bitsandbytes puts the 4-bit model on the GPU when there is one. SFTConfig defaults to bf16 (autocast, on CPU too)
# and to gradient checkpointing: the job computes in its own dtype, without checkpointing, like every other tool.
gpu = {"bf16": job["bf16"], "optim": job["optim"], "gradient_checkpointing": False}
device = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False} if job["device"] == "cpu" else gpu
config = SFTConfig(output_dir=sys.argv[2], max_length=job["max_length"], packing=job["packing"],
                   per_device_train_batch_size=job["batch_size"], learning_rate=job["learning_rate"],
                   lr_scheduler_type=job["scheduler"], warmup_steps=job["warmup_steps"], max_steps=job["steps"],
                   seed=job["seed"], logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
                   dataloader_num_workers=0, **device)
rows = datasets.load_dataset("json", data_files=job["train"], split="train")
trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=lora)
trainer.train()
trainer.save_model(sys.argv[2])
'''


def trl_config(job: Job, out: Path) -> list[str]:
    script = out / "plain_trl.py"
    script.write_text(TRL_SCRIPT)
    return [str(script), json.dumps(asdict(job)), str(out / "trl-out")]


def qlora_kit_config(
    job: Job, out: Path, recipe: Path, tool: str = "qlora-kit", extra: tuple[str, ...] = ()
) -> list[str]:
    overrides = [
        f"training.max_steps={job.steps}",
        f"training.warmup_steps={job.warmup_steps}",
        f"training.seed={job.seed}",
        f"training.packing={str(job.packing).lower()}",
        "training.save_strategy=no",
        "training.report_to=none",
        "training.logging_steps=10",
        "training.dataloader_num_workers=0",
        "training.disable_tqdm=true",
        "eval.num_samples=0",
        f"data.cache_dir={out / 'qlora-kit-cache'}",
        *extra,
    ]
    return ["-m", "qlora_kit", "train", str(recipe), *overrides, "--output-dir", str(out / f"{tool}-out"), "--force"]


def adapter_dir(tool: str, out: Path) -> Path:
    return {
        "qlora-kit": out / "qlora-kit-out" / "adapter",
        "qlora-kit-torch2.9": out / "qlora-kit-torch2.9-out" / "adapter",
        "llamafactory": out / "llamafactory-out",
        "axolotl": out / "axolotl-out",
        "trl": out / "trl-out",
    }[tool]


# ---------------------------------------------------------------------------------------------------------------
# Running and measuring


@dataclass(frozen=True)
class Measure:
    """How each run is measured: the device, torch's CPU threads, and the steps left out of the throughput."""

    device: str = "cpu"
    threads: int = 2
    skip_steps: int = 5
    profile: bool = False


def run_tool(tool: str, command: list[str], python: str, out: Path, measure: Measure) -> dict:
    """One training run in a fresh process; per-step figures from the hook, wall time and peak RSS from wait4, and
    on cuda the process's peak GPU memory.

    With ``measure.profile``, the hook also runs the torch profiler over steps 6-10 and writes the ops that took the
    most time to ``{tool}-profile.txt`` (the profiler slows those steps, so a profiled run's speed is not reported)."""
    record = out / f"{tool}-steps.json"
    record.unlink(missing_ok=True)
    profiling = {"QLORA_KIT_PEERS_PROFILE": str(out / f"{tool}-profile.txt")} if measure.profile else {}
    threads = measure.threads
    env = {
        **profiling,
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HOOK), str(REPO), *_own_path(python)]),
        "QLORA_KIT_PEERS_OUT": str(record),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **device_env(measure.device),
        "WANDB_DISABLED": "true",
        "AXOLOTL_DO_NOT_TRACK": "1",  # no telemetry upload attempts (there is no network to reach anyway)
        "DISABLE_VERSION_CHECK": "1",  # LLaMA-Factory: its own pins are what pip installed
    }
    log = out / f"{tool}.log"
    started = time.time()
    with log.open("w") as handle:
        # qlora-kit reads the recipe's relative paths from the repository root; the peers write beside their configs.
        cwd = REPO if tool.startswith("qlora-kit") else out
        child = subprocess.Popen([python, *command], cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.time() - started
    if os.waitstatus_to_exitcode(status) != 0 or not record.is_file():
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"{tool} failed (exit {os.waitstatus_to_exitcode(status)}), see {log}:\n{tail}")
    steps = json.loads(record.read_text())
    if not steps.get("four_bit_weights"):
        raise RuntimeError(f"{tool} trained without 4-bit weights (its configuration is not QLoRA), see {log}")
    if steps.get("gradient_checkpointing"):
        raise RuntimeError(f"{tool} trained with gradient checkpointing, which the job leaves off, see {log}")
    gpu = {"peak_gpu_mib": steps["cuda_peak_allocated_bytes"] / 2**20} if "cuda_peak_allocated_bytes" in steps else {}
    return {
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        **gpu,
        "four_bit_weights": steps["four_bit_weights"],
        "trainable_parameters": steps["trainable_parameters"],
        **summarize_steps(steps, started, measure.skip_steps),
    }


def summarize_steps(record: dict, started: float, warmup: int = 5) -> dict:
    """Per-step figures over the steps after the first ``warmup`` (at least 1: the first stamp starts the clock)."""
    steps = record["steps"]
    measured = steps[warmup:]
    seconds = measured[-1]["t"] - steps[warmup - 1]["t"]
    losses = [s["loss"] for s in steps[-10:] if s["loss"] is not None]
    return {
        "steps": len(steps),
        "threads": record["threads"],
        "first_step_s": steps[0]["t"] - started,
        "step_ms": 1000 * seconds / len(measured),
        "input_tokens_per_s": sum(s["input"] for s in measured) / seconds,
        "trained_tokens_per_s": sum(s["trained"] for s in measured) / seconds,
        "final_train_loss": sum(losses) / len(losses),
    }


HELDOUT = """
import json, sys
from peft import PeftModel
from qlora_kit import data as data_stage, model as model_stage, tokenizer as tokenizer_rules
from qlora_kit.evaluate.generation import heldout_loss
from qlora_kit.recipe import load_recipe
recipe = load_recipe(sys.argv[1], ["data.cache=false"])
tokenizer = tokenizer_rules.load_tokenizer(recipe)
prepared = data_stage.build_datasets(recipe, tokenizer, show_progress=False)
# Score each answer up to and including its end-of-turn token: the template's newline after it is formatting that
# generation never produces, and not every tool trains it (axolotl does not), so it would decide the comparison alone.
end = tokenizer.convert_tokens_to_ids(sys.argv[3])
ids = prepared.eval["input_ids"]
labels = [[-100 if i and row[i - 1] == end else label for i, label in enumerate(lab)]
          for row, lab in zip(ids, prepared.eval["labels"])]
scored = {"input_ids": ids, "labels": labels}
losses = {}
for name, adapter in json.loads(sys.argv[2]).items():
    model = PeftModel.from_pretrained(model_stage.load_base_model(recipe, tokenizer), adapter)
    losses[name] = heldout_loss(model, scored, tokenizer.pad_token_id)
print(json.dumps(losses))
"""


def _own_path(python: str) -> list[str]:
    """This process's PYTHONPATH for the tools that run in this Python (qlora-kit, trl), where packages may come from
    it; never for a peer's own virtual environment, which must see only what was installed there."""
    if python != sys.executable or not os.environ.get("PYTHONPATH"):
        return []
    return [os.environ["PYTHONPATH"]]


def heldout_losses(recipe: Path, adapters: dict[str, str], end_of_turn: str, device: str = "cpu") -> dict[str, float]:
    """One script, one tokenization of the held-out data, for every tool's adapter, on the device the tools used."""
    env = {
        **os.environ,
        **device_env(device),
        "PYTHONPATH": os.pathsep.join([str(REPO), *_own_path(sys.executable)]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", HELDOUT, str(recipe), json.dumps(adapters), end_of_turn],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict]]) -> str:
    columns = [
        ("wall time (s)", "wall_s", "{:.1f}"),
        ("time to first step (s)", "first_step_s", "{:.1f}"),
        ("step (ms)", "step_ms", "{:.0f}"),
        ("trained tokens/s", "trained_tokens_per_s", "{:,.0f}"),
        ("input tokens/s", "input_tokens_per_s", "{:,.0f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:,.0f}"),
        ("peak GPU memory (MiB)", "peak_gpu_mib", "{:,.0f}"),
        ("final train loss", "final_train_loss", "{:.3f}"),
        ("held-out loss", "heldout_loss", "{:.3f}"),
    ]
    runs = [run for tool_runs in results.values() for run in tool_runs]
    columns = [c for c in columns if c[1] != "peak_gpu_mib" or any("peak_gpu_mib" in run for run in runs)]
    lines = ["| tool | " + " | ".join(c[0] for c in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for tool, runs in results.items():
        cells = [fmt.format(statistics.median(r[key] for r in runs)) for _, key, fmt in columns]
        lines.append(f"| {tool} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rescore(args: argparse.Namespace, job: Job) -> None:
    """The held-out loss of the last round's adapters, written over every round's figure in peers.json."""
    report = json.loads((args.workdir / "peers.json").read_text())
    results = report["results"]
    adapters = {tool: str(adapter_dir(tool, args.workdir)) for tool in results}
    device = report.get("device", "cpu")
    for tool, loss in heldout_losses(args.recipe.resolve(), adapters, job.end_of_turn, device).items():
        for run in results[tool]:
            run["heldout_loss"] = loss
    report["heldout_rescored_from_last_round"] = True
    (args.workdir / "peers.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))


def profile_tools(args: argparse.Namespace, commands: dict[str, tuple[str, list[str]]]) -> None:
    """Where each tool's packed step goes: the torch profiler's top ops, one run per tool, printed side by side."""
    measure = replace(measure_of(args), profile=True)
    for tool in args.tools:
        python, command = commands[tool]
        run_tool(tool, command, python, args.workdir, measure)
        print(f"\n## {tool}\n" + (args.workdir / f"{tool}-profile.txt").read_text(), flush=True)


def measure_of(args: argparse.Namespace) -> Measure:
    return Measure(device=args.device, threads=args.threads, skip_steps=args.skip_steps)


def tool_commands(job: Job, args: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    """Each tool's Python and command line for the job (writing the peers' configurations into --workdir)."""
    return {
        "qlora-kit": (sys.executable, qlora_kit_config(job, args.workdir, args.recipe.resolve(), extra=args.override)),
        "llamafactory": (str(args.cache_dir / "llamafactory/bin/python"), llamafactory_config(job, args.workdir)),
        "axolotl": (str(args.cache_dir / "axolotl/bin/python"), axolotl_config(job, args.workdir)),
        "trl": (sys.executable, trl_config(job, args.workdir)),
        "qlora-kit-torch2.9": (
            str(args.cache_dir / "qlora-kit-torch2.9/bin/python"),
            qlora_kit_config(job, args.workdir, args.recipe.resolve(), "qlora-kit-torch2.9", args.override),
        ),
    }


def run_rounds(args: argparse.Namespace, job: Job) -> dict[str, list[dict]]:
    """Every round runs each tool once, in order, then scores the round's adapters; each run's figures, per tool."""
    commands = tool_commands(job, args)
    seed = job.seed
    results: dict[str, list[dict]] = {tool: [] for tool in args.tools}
    for round_ in range(1, args.rounds + 1):
        if args.vary_seed:  # round r trains with seed + r - 1: the held-out median is then over seeds, not reruns
            job = replace(job, seed=seed + round_ - 1)
            commands = tool_commands(job, args)
        for tool in args.tools:
            python, command = commands[tool]
            run = run_tool(tool, command, python, args.workdir, measure_of(args))
            results[tool].append({**run, "seed": job.seed})
            print(f"round {round_} {tool}: " + json.dumps({k: round(v, 3) for k, v in run.items()}), flush=True)
        adapters = {tool: str(adapter_dir(tool, args.workdir)) for tool in args.tools}
        heldout = heldout_losses(args.recipe.resolve(), adapters, job.end_of_turn, args.device)
        for tool, loss in heldout.items():
            results[tool][-1]["heldout_loss"] = loss
        print(f"round {round_} held-out loss (seed {job.seed}): " + json.dumps(heldout), flush=True)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, the same for every tool")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where every tool trains (default: cuda when torch sees a GPU, else cpu)",
    )
    parser.add_argument(
        "--skip-steps",
        type=int,
        default=5,
        help="optimizer steps left out of step time and tokens/s (warm-up); --steps must be larger",
    )
    parser.add_argument("--no-packing", dest="packing", action="store_false")
    parser.add_argument("--end-of-turn", default="<|im_end|>", help="the chat template's end-of-turn token (ChatML)")
    parser.add_argument(
        "--tools",
        nargs="+",
        default=list(TOOLS),
        choices=TOOLS,
        help="the tools to run, in this order each round; only these peers are installed",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "qlora-kit-peers")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "peers")
    parser.add_argument("--install-only", action="store_true")
    parser.add_argument(
        "--override",
        nargs="+",
        default=(),
        metavar="KEY=VALUE",
        help="recipe overrides for qlora-kit's runs only (an A/B against the peers, e.g. lora.lora_dropout=0.1)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one run of each tool under the torch profiler (steps 6-10); prints where each tool's step goes",
    )
    parser.add_argument("--seed", type=int, help="the job's seed (default: the recipe's); with --vary-seed, the first")
    parser.add_argument(
        "--vary-seed",
        action="store_true",
        help="train round r with the recipe's seed + r - 1 (every tool the same seed in a round), to compare held-out "
        "loss across seeds rather than across reruns of one seed",
    )
    parser.add_argument(
        "--heldout-only",
        action="store_true",
        help="recompute the held-out loss of the adapters the last round left in --workdir and reprint the table",
    )
    return checked(parser, parser.parse_args(argv))


def checked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The device settled (cuda when torch sees a GPU) and the step counts checked: a mistake exits 2 in one line."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda: torch sees no GPU here; use --device cpu\n")
    if not 1 <= args.skip_steps < args.steps:
        parser.exit(2, f"error: --skip-steps {args.skip_steps}: give at least 1 and fewer than --steps {args.steps}\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    installs, left_out = install(args.cache_dir, args.tools)
    print("install seconds:", {k: round(v) for k, v in installs.items()}, flush=True)
    if args.install_only:
        return 1 if left_out else 0
    job = job_from_recipe(args.recipe, args.steps, args.packing, args.end_of_turn, args.device)
    if args.seed is not None:
        job = replace(job, seed=args.seed)
    if args.heldout_only:
        rescore(args, job)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    for tool in (tool for tool in args.tools if tool in ENTRY_MODULES and tool not in left_out):
        error = import_error(args.cache_dir, tool, args.device)
        if error:
            left_out[tool] = f"does not import: {error}"
            print(f"{tool} is installed but cannot run here, left out: {error}", flush=True)
    args.tools = [tool for tool in args.tools if tool not in left_out]
    if not args.tools:
        print("error: every tool asked for was left out (see above); nothing to compare", file=sys.stderr)
        return 1
    if args.profile:
        profile_tools(args, tool_commands(job, args))
        return 0
    results = run_rounds(args, job)
    report = {"job": asdict(job), "device": args.device, "threads": args.threads, "skip_steps": args.skip_steps}
    report |= {"installs_s": installs, "results": results, "left_out": left_out}
    report["peer_versions"] = peer_versions(args.cache_dir, args.tools)
    (args.workdir / "peers.json").write_text(json.dumps(report, indent=1) + "\n")
    packing = "on" if job.packing else "off"
    print(f"\n{args.rounds} rounds on {args.device}, {args.threads} threads each, packing {packing}; medians:")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
