"""Launching: the shipped accelerate profiles, each pre-flight check on its own, placement, and real DDP on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_kit import launch
from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.cli import main
from qlora_kit.errors import UserError
from qlora_kit.recipe import load_recipe, validate
from qlora_kit.resolve import Launch as Plan
from qlora_kit.resolve import Machine, launch_from_env, resolve

from .conftest import REPO, tiny_recipe

CPU = Machine()
T4 = Machine(cuda_devices=1, name="Tesla T4", capability=(7, 5), memory_bytes=16 * 2**30)
FOUR_GPUS = Machine(cuda_devices=4, name="NVIDIA H100", capability=(9, 0), memory_bytes=80 * 2**30)
FSDP = Plan("fsdp", 4, source="ACCELERATE_USE_FSDP=true")
DDP = Plan("ddp", 2, source="WORLD_SIZE=2")


def make_recipe(**sections):
    raw = {"model": {"name_or_path": "some/model"}, "data": {"train": [{"path": "train.jsonl"}]}}
    for key, value in sections.items():
        raw[key] = value
    return validate(raw)


def problems(recipe, plan=Plan(), hardware=CPU, profile=None) -> str:
    with pytest.raises(UserError) as info:
        launch.preflight(recipe, plan, hardware, profile)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Profiles


PROFILE_TYPES = {
    "single_gpu": "NO",
    "ddp": "MULTI_GPU",
    "fsdp_qlora": "FSDP",
    "zero3": "DEEPSPEED",
    "multi_node": "MULTI_GPU",
}


def test_every_shipped_profile_is_a_valid_accelerate_config_and_documents_its_command():
    from accelerate.commands.config.config_args import load_config_from_file

    paths = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
    assert {p.stem for p in paths} == set(PROFILE_TYPES)
    for path in paths:
        config = load_config_from_file(str(path))  # accelerate's own parser and validation
        assert str(config.distributed_type).split(".")[-1] == PROFILE_TYPES[path.stem], path.name
        header = path.read_text().split("\ncompute_environment")[0]
        assert f"recipes/accelerate/{path.name}" in header or f"--accelerate-profile {path.stem}" in header, path.name
        assert launch.resolve_profile(path.stem) == path.resolve()


def test_sharded_profiles_carry_the_settings_qlora_needs():
    fsdp = launch.load_profile(launch.resolve_profile("fsdp_qlora"))["fsdp_config"]
    # FSDP2: every parameter sharded on its own (no flat tensor mixing frozen 4-bit and trainable LoRA weights), one
    # group per decoder layer, sharded checkpoints. 4-bit weights cannot be loaded on the meta device, so no
    # rank-0-only loading.
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["fsdp_cpu_ram_efficient_loading"] is False
    zero = launch.load_profile(launch.resolve_profile("zero3"))["deepspeed_config"]
    assert zero["zero_stage"] == 3 and zero["zero3_save_16bit_model"] is True  # the adapter is gathered on save
    multi = launch.load_profile(launch.resolve_profile("multi_node"))
    # The meeting point is this cluster's own: pre-flight asks for it rather than shipping an address that hangs.
    assert multi["num_machines"] == 2 and multi["main_process_ip"] is None and multi["main_process_port"] == 29500


def test_profiles_map_to_the_distributed_mode():
    modes = {
        name: launch.launch_from_profile(launch.load_profile(launch.resolve_profile(name)), name)
        for name in PROFILE_TYPES
    }
    assert {name: plan.mode for name, plan in modes.items()} == {
        "single_gpu": "single",
        "ddp": "ddp",
        "fsdp_qlora": "fsdp",
        "zero3": "deepspeed",
        "multi_node": "ddp",
    }
    assert modes["fsdp_qlora"].sharded and modes["zero3"].sharded and not modes["ddp"].sharded
    assert modes["multi_node"].world_size == 16


def test_unknown_profile_names_the_shipped_ones():
    with pytest.raises(UserError, match="launch.accelerate_profile: unknown profile 'fsdp'.*fsdp_qlora"):
        launch.resolve_profile("fsdp")


def test_relaunch_runs_the_same_command_under_accelerate():
    profile = launch.load_profile(launch.resolve_profile("ddp"))
    assert launch.launch_processes(profile, FOUR_GPUS) == 4  # one process per visible GPU
    assert launch.launch_processes(profile, CPU) is None  # the profile's own num_processes
    command = launch.relaunch_command(Path("p.yaml"), ["train", "r.yaml", "--accelerate-profile", "ddp"], 4)
    assert command[1:] == [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "p.yaml",
        "--num_processes",
        "4",
        "-m",
        "qlora_kit",
        "train",
        "r.yaml",
        "--accelerate-profile",
        "ddp",
    ]


def test_a_worker_launched_by_hand_must_run_the_profiles_mode():
    profile = launch.load_profile(launch.resolve_profile("fsdp_qlora"))
    launch.check_profile_matches(profile, "fsdp_qlora.yaml", launch_from_env({"ACCELERATE_USE_FSDP": "true"}))
    with pytest.raises(UserError, match="fsdp_qlora.yaml is fsdp but this process runs ddp"):
        launch.check_profile_matches(profile, "fsdp_qlora.yaml", launch_from_env({"WORLD_SIZE": "2"}))


def test_mode_is_read_from_the_environment_accelerate_sets():
    assert launch_from_env({}) == Plan()
    assert launch_from_env({"WORLD_SIZE": "4"}).mode == "ddp"
    assert launch_from_env({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "8"}).sharded
    zero2 = launch_from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    zero3 = launch_from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert zero2.mode == zero3.mode == "deepspeed" and not zero2.sharded and zero3.sharded


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight checks, one by one


def test_fsdp_needs_quant_storage_equal_to_compute_dtype():
    wrong = make_recipe(quantization={"bnb_4bit_compute_dtype": "bfloat16"})
    message = problems(wrong, FSDP, FOUR_GPUS)
    assert (
        "quantization.bnb_4bit_quant_storage" in message
        and "set it to bfloat16 (it is uint8, an integer dtype" in message
    )
    assert "ACCELERATE_USE_FSDP=true" in message
    right = make_recipe(quantization={"bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "bfloat16"})
    launch.preflight(right, FSDP, FOUR_GPUS)
    launch.preflight(wrong, DDP, CPU)  # DDP keeps whole models per process: any storage dtype works


def test_shipped_fsdp_and_zero3_profiles_pass_with_a_recipe_set_up_for_them():
    right = make_recipe(quantization={"bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "bfloat16"})
    wrong = make_recipe(
        quantization={"bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "float32"},
        model={"name_or_path": "some/model", "dtype": "float32"},
    )
    import importlib.util

    for name in ("fsdp_qlora", "zero3"):
        plan = launch.launch_from_profile(launch.load_profile(launch.resolve_profile(name)), name)
        missing = name == "zero3" and importlib.util.find_spec("deepspeed") is None
        if missing:  # refused up front, naming the package, instead of failing inside every worker
            assert "uses DeepSpeed, which is not installed" in problems(right, plan, FOUR_GPUS)
        else:
            launch.preflight(right, plan, FOUR_GPUS)
        message = problems(wrong, plan, FOUR_GPUS)
        assert f"{2 + missing} problems" in message and "model.dtype" in message and f"profile {name}" in message


def test_bf16_on_hardware_without_it():
    recipe = make_recipe(quantization={"bnb_4bit_compute_dtype": "bfloat16"}, training={"bf16": True})
    message = problems(recipe, hardware=T4)
    assert "quantization.bnb_4bit_compute_dtype: bfloat16 was asked but Tesla T4 has no native bfloat16" in message
    assert "training.bf16" in message and "float16" in message
    launch.preflight(recipe, Plan(), CPU)  # torch runs bfloat16 on every CPU
    launch.preflight(make_recipe(), Plan(), T4)  # auto picks float32 there, nothing to complain about


def test_ddp_with_a_device_map_that_spans_devices():
    spread = make_recipe(launch={"device_map": "auto"})
    message = problems(spread, DDP, FOUR_GPUS)
    assert "launch.device_map: auto spreads one model over every GPU" in message and "2 processes" in message
    launch.preflight(spread, Plan(), FOUR_GPUS)  # one process spreading the model: naive model parallel is fine
    launch.preflight(make_recipe(), DDP, FOUR_GPUS)


def test_several_gpus_visible_but_one_process():
    message = problems(make_recipe(), Plan(), FOUR_GPUS)
    assert "4 GPUs are visible but this is one process" in message and "--accelerate-profile ddp" in message
    launch.preflight(make_recipe(), Plan("ddp", 4), FOUR_GPUS)


def test_pad_token_equal_to_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    with pytest.raises(UserError, match="pad token '<\\|endoftext\\|>' is the EOS token.*distinct pad token"):
        tokenizer_rules.check_pad_token(tokenizer)
    recipe = make_recipe(model={"name_or_path": str(tiny_model_dir)})
    # qlora-kit's loader always picks another pad token
    tokenizer_rules.check_pad_token(tokenizer_rules.load_tokenizer(recipe))


def test_packing_needs_attention_that_keeps_examples_apart(tiny_model_dir, tmp_path):
    wrapped = make_recipe(
        model={"name_or_path": str(tiny_model_dir)}, training={"packing": True, "packing_strategy": "wrapped"}
    )
    assert "training.packing_strategy: 'wrapped' cuts examples" in problems(wrapped)
    llama = make_recipe(model={"name_or_path": str(tiny_model_dir)}, training={"packing": True})
    launch.preflight(llama, Plan(), CPU)  # sdpa + Llama: masks are built per example from position_ids
    # A model whose attention code ignores position_ids when masking (no create_causal_mask): only a config is
    # needed, since the check reads no weights.
    from transformers import MambaConfig

    MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(tmp_path)
    mamba = make_recipe(
        model={"name_or_path": str(tmp_path), "attn_implementation": "sdpa"}, training={"padding_free": True}
    )
    assert "model.attn_implementation: sdpa with this model's attention code cannot tell packed" in problems(mamba)
    flash = make_recipe(
        model={"name_or_path": str(tmp_path), "attn_implementation": "flash_attention_2"}, training={"packing": True}
    )
    launch.preflight(flash, Plan(), CPU)
    launch.preflight(make_recipe(model={"name_or_path": str(tmp_path)}), Plan(), CPU)  # no packing, no check
    # Packing is on by default wherever examples stay apart, and switches itself off where they would not.
    assert resolve(make_recipe(model={"name_or_path": str(tiny_model_dir)}), CPU).packing
    assert not resolve(make_recipe(model={"name_or_path": str(tmp_path)}), CPU).packing
    assert not resolve(make_recipe(model={"name_or_path": str(tiny_model_dir)}, training={"packing": False})).packing


def test_auto_attention_is_sdpa_without_a_gpu_and_an_explicit_kernel_is_kept(tiny_model_dir):
    import importlib.util

    import torch

    from qlora_kit import model as model_stage

    auto = make_recipe(model={"name_or_path": str(tiny_model_dir)})
    assert auto.model.attn_implementation == "auto"
    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    assert resolve(auto).attn_implementation == ("flash_attention_2" if flash else "sdpa")
    assert model_stage.load_base_model(auto).config._attn_implementation == resolve(auto).attn_implementation
    eager = make_recipe(model={"name_or_path": str(tiny_model_dir), "attn_implementation": "eager"})
    assert resolve(eager).attn_implementation == "eager"
    assert model_stage.load_base_model(eager).config._attn_implementation == "eager"


def test_reporting_backends_must_be_installed():
    import importlib.util

    for name in ("wandb", "mlflow", "trackio"):
        recipe = make_recipe(training={"report_to": ["tensorboard", name]})
        if importlib.util.find_spec(name) is None:
            assert f"training.report_to: {name} is not installed: pip install " in problems(recipe)
        else:
            launch.preflight(recipe, Plan(), CPU)
    launch.preflight(make_recipe(training={"report_to": "tensorboard"}), Plan(), CPU)


def test_all_problems_are_reported_at_once():
    recipe = make_recipe(
        quantization={"bnb_4bit_compute_dtype": "bfloat16"},
        launch={"device_map": "auto"},
        training={"packing": True, "packing_strategy": "wrapped"},
    )
    message = problems(recipe, FSDP, Machine(8, "Tesla V100", (7, 0)))
    assert message.startswith("pre-flight check found 4 problems")


def test_checks_run_before_any_weight_is_loaded(tiny_model_dir, arithmetic_rows, tmp_path, monkeypatch, capsys):
    # A model folder with a config and tokenizer but no weights: the check's error, not a load error, proves it ran
    # first. The environment is what `accelerate launch` sets for an FSDP worker.
    config_only = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, config_only, ignore=shutil.ignore_patterns("*.safetensors"))
    recipe = tiny_recipe(tmp_path, config_only, arithmetic_rows)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert (
        main(
            [
                "train",
                str(recipe),
                "--output-dir",
                str(tmp_path / "run"),
                "quantization.bnb_4bit_compute_dtype=bfloat16",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert "error: pre-flight check found 2 problems: quantization.bnb_4bit_quant_storage" in error
    assert "is FSDP version 1, which accelerate runs on GPUs only: set fsdp_config.fsdp_version: 2" in error
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight for every profile on every machine: what cannot run is one error line before any process starts

FSDP2 = Plan("fsdp", 2, source="profile fsdp_qlora.yaml", fsdp_version=2)
ZERO3 = Plan("deepspeed", 2, 3, source="profile zero3.yaml")
FLOAT32_STORAGE = {"bnb_4bit_quant_storage": "float32"}  # the compute dtype on CPU


def shipped(name: str, machine=CPU, processes=None) -> tuple[Plan, dict]:
    profile = launch.load_profile(launch.resolve_profile(name))
    return launch.launch_from_profile(profile, f"{name}.yaml", processes), profile


def test_fsdp2_shards_on_a_machine_without_gpus_and_fsdp1_is_refused_there():
    recipe = make_recipe(quantization=FLOAT32_STORAGE)
    plan, profile = shipped("fsdp_qlora")
    assert plan == FSDP2 and launch.preflight(recipe, plan, CPU, profile).launch.sharded
    fsdp1 = Plan("fsdp", 2, source="profile old.yaml", fsdp_version=1)
    message = problems(recipe, fsdp1, CPU)
    assert message == (
        "pre-flight check found a problem: launch.accelerate_profile: profile old.yaml is FSDP version 1, which "
        "accelerate runs on GPUs only: set fsdp_config.fsdp_version: 2 in the profile (the shipped fsdp_qlora "
        "profile runs on CPU processes over gloo), or run on a GPU machine"
    )
    launch.preflight(
        make_recipe(quantization={"bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "bfloat16"}),
        fsdp1,
        FOUR_GPUS,
    )
    assert launch_from_env({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}).fsdp_version == 2


def test_integer_quant_storage_is_named_as_what_fsdp_cannot_flatten():
    message = problems(make_recipe(), FSDP2, CPU)  # uint8 is the schema's default storage
    assert "set it to float32 (it is uint8, an integer dtype that FSDP cannot flatten or shard)" in message


def test_fsdp_with_an_8bit_base_is_refused():
    recipe = make_recipe(quantization={"load_in_4bit": False, "load_in_8bit": True})
    message = problems(recipe, FSDP2, CPU)
    assert message.startswith("pre-flight check found a problem: quantization.load_in_8bit: FSDP (profile")
    assert "set quantization.load_in_8bit: false and load_in_4bit: true" in message
    launch.preflight(recipe, DDP, CPU)  # whole 8-bit models per process are fine


def test_more_processes_than_gpus_on_a_gpu_machine():
    recipe = make_recipe(quantization={"bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "bfloat16"})
    by_hand = launch_from_env({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true"})
    message = problems(recipe, by_hand, FOUR_GPUS)
    assert "starts 8 processes on this machine (8) but it has 4 GPUs, so ranks would share one" in message
    assert "set num_processes to 4 (one per GPU)" in message
    multi = Plan("ddp", 16, source="profile multi_node.yaml", machines=2)  # 8 per machine
    assert "set num_processes to 8 (one per GPU over 2 machines)" in problems(make_recipe(), multi, FOUR_GPUS)
    launch.preflight(make_recipe(), Plan("ddp", 8, source="profile multi_node.yaml", machines=2), FOUR_GPUS)
    # Through --accelerate-profile a single-machine profile starts one process per visible GPU, so it always fits.
    plan, profile = shipped("fsdp_qlora", FOUR_GPUS, launch.launch_processes(shipped("fsdp_qlora")[1], FOUR_GPUS))
    launch.preflight(recipe, plan, FOUR_GPUS, profile)
    launch.preflight(make_recipe(), DDP, CPU)  # CPU processes need no GPU each


def test_multi_node_profile_needs_its_rendezvous_settings():
    plan, profile = shipped("multi_node")
    assert plan.machines == 2 and plan.local_processes == 8
    eight = Machine(8, "NVIDIA H100", (9, 0), 80 * 2**30)
    message = problems(make_recipe(), plan, eight, profile)
    assert message == (
        "pre-flight check found a problem: launch.accelerate_profile: profile multi_node.yaml runs on 2 machines "
        "but sets no main_process_ip: in a copy of the profile set main_process_ip to machine 0's address, "
        "main_process_port to a port open between them (29500), and machine_rank to this machine's number (0 to 1), "
        "then pass the copy's path"
    )
    bare = {key: value for key, value in profile.items() if key not in launch.RENDEZVOUS}
    assert "sets no main_process_ip, main_process_port, machine_rank" in problems(make_recipe(), plan, eight, bare)
    wrong_rank = {**profile, "main_process_ip": "10.1.2.3", "machine_rank": 2}
    assert "has machine_rank 2: set it to this machine's number, 0 to 1" in problems(
        make_recipe(), plan, eight, wrong_rank
    )
    launch.preflight(make_recipe(), plan, eight, {**profile, "main_process_ip": "10.1.2.3"})


def test_a_launch_refused_by_preflight_starts_no_process(tmp_path, monkeypatch, capsys):
    # The user's command on a machine without GPUs, with the shipped multi-node profile: one line, exit 2, and no
    # accelerate launcher was started (it would print its own traceback).
    import subprocess as subprocess_module

    started = []
    monkeypatch.setattr(subprocess_module, "Popen", lambda *a, **k: started.append(a))
    for name in ("LOCAL_RANK", "ACCELERATE_MIXED_PRECISION", launch.LAUNCHED_ENV):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"model": {"name_or_path": "some/model"}, "data": {"train": [{"path": str(tmp_path / "train.jsonl")}]}}
        )
    )
    assert (
        main(["train", str(recipe), "--output-dir", str(tmp_path / "run"), "--accelerate-profile", "multi_node"]) == 2
    )
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(
        "error: pre-flight check found a problem: launch.accelerate_profile"
    )
    assert "runs on 2 machines but sets no main_process_ip" in error[0] and not started


def test_deepspeed_needs_the_package_and_on_cpu_a_compiler(monkeypatch):
    import importlib.util

    recipe = make_recipe(quantization=FLOAT32_STORAGE)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a)
    )
    message = problems(recipe, ZERO3, CPU)
    assert message.endswith(
        "uses DeepSpeed, which is not installed: pip install deepspeed (on a machine without GPUs it runs on its "
        "CPU accelerator), or use the fsdp_qlora profile"
    )
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real_find_spec(name, *a)
    )
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert "no C++ compiler is on PATH: install one (apt-get install g++, or set CXX)" in problems(recipe, ZERO3, CPU)
    launch.preflight(
        make_recipe(quantization={"bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "bfloat16"}),
        ZERO3,
        FOUR_GPUS,
    )  # GPUs need no compiler
    monkeypatch.delenv("CXX")
    launch.preflight(recipe, ZERO3, CPU)


def test_deepspeed_precision_follows_the_recipe(monkeypatch):
    recipe = make_recipe(quantization=FLOAT32_STORAGE)
    resolved = resolve(recipe, CPU, ZERO3)
    assert launch.mixed_precision(resolved) == "no"
    bf16 = make_recipe(quantization={"bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "bfloat16"})
    assert launch.mixed_precision(resolve(bf16, FOUR_GPUS, ZERO3)) == "bf16"
    message = launch.check_deepspeed_precision(resolved, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert message == [
        "launch.accelerate_profile: DeepSpeed was launched with mixed_precision bf16 but the recipe trains in "
        "float32: launch with --mixed_precision no (qlora-kit train --accelerate-profile passes it itself)"
    ]
    assert launch.check_deepspeed_precision(resolved, {"ACCELERATE_MIXED_PRECISION": "no"}) == []
    command = launch.relaunch_command(Path("zero3.yaml"), ["train", "r.yaml"], None, "no")
    assert command[command.index("--mixed_precision") + 1] == "no"


# ---------------------------------------------------------------------------------------------------------------
# Placement and trainer settings


def test_device_map_follows_the_distributed_mode():
    recipe = make_recipe()
    assert resolve(recipe, CPU, FSDP).device_map is None  # FSDP/ZeRO-3 place the shards themselves
    assert resolve(recipe, CPU, Plan("deepspeed", 2, 3)).device_map is None
    assert resolve(recipe, CPU, DDP).device_map == {"": "cpu"}
    assert resolve(recipe, FOUR_GPUS, DDP).device_map == {"": 0}  # LOCAL_RANK of this process; 0 when unset
    assert resolve(make_recipe(launch={"device_map": "balanced"}), CPU, Plan()).device_map == "balanced"


def test_trainer_settings_for_peft_under_ddp(tmp_path):
    from qlora_kit.train import sft_config

    config = sft_config(make_recipe(), tmp_path, has_eval=False)
    assert config.ddp_find_unused_parameters is False  # every LoRA weight is used; the search breaks checkpointing
    assert config.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert config.use_cpu is (not torch.cuda.is_available())  # CPU processes form a gloo DDP group


# ---------------------------------------------------------------------------------------------------------------
# Real DDP: two CPU processes over gloo, through the shipped ddp profile


def _losses(run: Path) -> list[float]:
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_ddp_on_two_cpu_processes_matches_one_process(tiny_model_dir, arithmetic_rows, tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        arithmetic_rows,
        max_steps=4,
        save_strategy="steps",
        save_steps=4,
        report_to="tensorboard",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "qlora_kit", "train", str(recipe), "eval.num_samples=1"]
    # The same global batch of 4: two processes x 2 examples, against one process x 4.
    ddp = subprocess.run(
        [
            *base,
            "--output-dir",
            str(tmp_path / "ddp"),
            "--accelerate-profile",
            "ddp",
            "training.per_device_train_batch_size=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run(
        [*base, "--output-dir", str(tmp_path / "one"), "training.per_device_train_batch_size=4"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and {k: metrics["launch"][k] for k in ("mode", "processes", "resumed_from")} == {
        "mode": "ddp",
        "processes": 2,
        "resumed_from": None,
    }
    whole = metrics["launch"]["parameter_bytes"]
    assert whole["main_process"] == whole["whole"] > 0  # DDP: every process holds the whole model
    # Both ranks trained: each wrote its own RNG state into the checkpoint; only one wrote the run directory.
    assert {p.name for p in (tmp_path / "ddp" / "checkpoint-4").glob("rng_state*")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    assert ddp.stdout.count("adapter: ") == 1 and not list(tmp_path.glob(".ddp*"))
    torch.testing.assert_close(_losses(tmp_path / "ddp"), _losses(tmp_path / "one"), rtol=1e-5, atol=0)
    adapter_ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    adapter_one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert adapter_ddp.keys() == adapter_one.keys() and len(adapter_ddp) == 2 * 7 * 2  # complete: every layer
    for name in adapter_one:
        torch.testing.assert_close(adapter_ddp[name], adapter_one[name], rtol=0, atol=1e-5)
    # Throughput and memory are logged with every loss, and TensorBoard (the default) wrote its events offline.
    logged = [
        e
        for e in json.loads((tmp_path / "ddp" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        if "loss" in e
    ]
    assert all(e["tokens_per_second"] > 0 and e["peak_memory_mib"] > 0 for e in logged)
    assert list((tmp_path / "ddp" / "runs").rglob("events.out.tfevents.*"))


def test_recipe_names_the_profile(tmp_path, tiny_model_dir, arithmetic_rows):
    raw = yaml.safe_load(tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows).read_text())
    raw["launch"] = {"accelerate_profile": "zero3"}
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(raw))
    assert load_recipe(tmp_path / "zero3.yaml").launch.accelerate_profile == "zero3"
    with pytest.raises(UserError, match="launch.device_map"):
        validate({**raw, "launch": {"device_map": "everywhere"}})
