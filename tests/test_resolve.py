"""Every `auto` is decided once, from the recipe, the machine and the launch: hand in a fake machine, see it change."""

from __future__ import annotations

import pytest
import torch

from qlora_kit import launch
from qlora_kit.errors import UserError
from qlora_kit.plan import plan_recipe
from qlora_kit.recipe import validate
from qlora_kit.resolve import Launch, Machine, resolve

GIB = 2**30
CPU = Machine()
T4 = Machine(cuda_devices=1, name="Tesla T4", capability=(7, 5), memory_bytes=16 * GIB)
V100 = Machine(cuda_devices=1, name="Tesla V100", capability=(7, 0), memory_bytes=32 * GIB)
A100 = Machine(cuda_devices=1, name="NVIDIA A100", capability=(8, 0), memory_bytes=80 * GIB, flash_attn=True)
H100 = Machine(cuda_devices=1, name="NVIDIA H100", capability=(9, 0), memory_bytes=80 * GIB)
EIGHT_H100 = Machine(cuda_devices=8, name="NVIDIA H100", capability=(9, 0), memory_bytes=80 * GIB)


def recipe(**sections):
    return validate(
        {"model": {"name_or_path": "arch:llama-3.1-8b"}, "data": {"train": [{"path": "x.jsonl"}]}, **sections}
    )


@pytest.mark.parametrize(
    ("machine", "dtype", "optim"),
    [
        (CPU, torch.float32, "adamw_torch"),
        # A T4 or V100 emulates bf16 (slowly) and fp16 overflows in long runs: auto computes in float32 there.
        (T4, torch.float32, "paged_adamw_8bit"),
        (V100, torch.float32, "paged_adamw_8bit"),
        (A100, torch.bfloat16, "paged_adamw_8bit"),
        (H100, torch.bfloat16, "paged_adamw_8bit"),
    ],
)
def test_auto_dtype_and_optimizer_follow_the_machine(machine, dtype, optim):
    resolved = resolve(recipe(), machine, Launch())
    assert resolved.compute_dtype == dtype and resolved.weights_dtype == dtype
    assert resolved.optim == optim
    assert resolved.bf16 == (dtype == torch.bfloat16) and not resolved.fp16
    assert resolved.use_cpu == (machine is CPU)


def test_explicit_settings_win_over_the_machine():
    asked = recipe(quantization={"bnb_4bit_compute_dtype": "float16"}, training={"optim": "adamw_torch"})
    resolved = resolve(asked, H100, Launch())
    assert resolved.compute_dtype == torch.float16 and resolved.fp16 and resolved.optim == "adamw_torch"


def test_flash_attention_only_where_it_runs():
    assert resolve(recipe(), A100, Launch()).attn_implementation == "flash_attention_2"
    assert resolve(recipe(), H100, Launch()).attn_implementation == "sdpa"  # flash-attn not installed there
    assert resolve(recipe(), T4, Launch()).attn_implementation == "sdpa"
    assert resolve(recipe(), CPU, Launch()).attn_implementation == "sdpa"


def test_packed_batches_are_one_row_only_for_varlen_flash_attention():
    packed = recipe(training={"packing": True})
    assert resolve(packed, A100, Launch()).packed_layout == "one-row"
    for machine in (H100, T4, CPU):  # sdpa: one row would be one (rows x length)^2 mask
        assert resolve(packed, machine, Launch()).packed_layout == "separate-rows"
    assert resolve(recipe(training={"packing": False}), A100, Launch()).packed_layout is None


def test_preflight_uses_the_machine_it_is_given():
    bf16 = recipe(quantization={"bnb_4bit_compute_dtype": "bfloat16"})
    with pytest.raises(UserError, match="Tesla T4 has no native bfloat16"):
        launch.preflight(bf16, Launch(), T4)
    assert launch.preflight(bf16, Launch(), A100).compute_dtype == torch.bfloat16
    with pytest.raises(UserError, match="8 GPUs are visible but this is one process"):
        launch.preflight(recipe(), Launch(), EIGHT_H100)
    eight = launch.preflight(recipe(), Launch("ddp", 8), EIGHT_H100)
    assert eight.launch.world_size == 8 and eight.compute_dtype == torch.bfloat16


def test_plan_and_run_resolve_the_same_dtype():
    # The planner sizes the run the machine will do: float32 compute on a T4 costs more than bf16 on an H100.
    on_t4, on_h100 = plan_recipe(recipe(), machine=T4), plan_recipe(recipe(), machine=H100)
    assert "compute 32-bit" in on_t4.notes[-1] and "compute 16-bit" in on_h100.notes[-1]
    assert on_t4.total > on_h100.total


def test_recorded_fields_are_what_was_resolved():
    fields = resolve(recipe(), A100, Launch()).recipe_fields()
    assert fields["quantization"]["bnb_4bit_compute_dtype"] == "bfloat16"
    assert fields["model"]["attn_implementation"] == "flash_attention_2"
    assert fields["training"]["optim"] == "paged_adamw_8bit" and fields["training"]["bf16"] is True


# ---------------------------------------------------------------------------------------------------------------
# The long-context memory switches


def test_memory_switches_read_transformers_names_before_their_aliases():
    from qlora_kit.resolve import memory_switches

    default = memory_switches(recipe())
    assert (default.checkpointing, default.use_reentrant, default.every_n_layers) == (True, False, 1)
    assert not (default.offloaded or default.liger or default.full_logits or default.selective)
    # activation_checkpointing (transformers 5) wins over qlora-kit's default gradient_checkpointing: true.
    assert memory_switches(recipe(training={"activation_checkpointing": False})).checkpointing is False
    switches = memory_switches(
        recipe(
            training={
                "gradient_checkpointing_kwargs": {"use_reentrant": True},
                "activation_checkpointing_kwargs": {"every_n_layers": 3, "selective": True},
                "activation_offloading": True,
                "label_smoothing_factor": 0.1,
            }
        )
    )
    assert (switches.every_n_layers, switches.selective, switches.use_reentrant) == (3, True, False)
    assert switches.activation_offloading and switches.offloaded and switches.full_logits
    assert resolve(recipe(training={"activation_offloading": True}), H100, Launch()).memory.activation_offloading


def test_memory_switches_that_cannot_run_here_are_one_line_each():
    def problems(machine, liger_types=None, **training):
        from qlora_kit.resolve import memory_switch_problems

        return memory_switch_problems(recipe(training=training), machine, liger_types)

    assert problems(CPU) == [] and problems(H100) == []
    (offloading,) = problems(CPU, activation_offloading=True)
    assert offloading.startswith("training.activation_offloading:") and "GPU" in offloading
    assert problems(H100, activation_offloading=True) == []
    (offload,) = problems(CPU, activation_checkpointing_kwargs={"offload": True})
    assert offload.startswith("training.activation_checkpointing_kwargs.offload:") and "pinned" in offload
    assert problems(A100, activation_checkpointing_kwargs={"offload": True}) == []
    (liger,) = problems(CPU, use_liger_kernel=True)
    assert "Triton" in liger and "GPU" in liger
    (missing,) = problems(H100, None, use_liger_kernel=True)
    assert "pip install 'qlora-kit[liger]'" in missing
    assert problems(H100, frozenset({"llama"}), use_liger_kernel=True) == []
    (fused,) = problems(
        H100, frozenset({"llama"}), use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True}
    )
    assert fused.startswith("training.liger_kernel_config.fused_linear_cross_entropy:")
    (typo,) = problems(CPU, activation_checkpointing_kwargs={"use_reentrent": True})
    assert "did you mean 'use_reentrant'" in typo
    assert len(problems(CPU, activation_checkpointing_kwargs={"every_n_layers": 0})) == 1
    (selective_off,) = problems(
        CPU, activation_checkpointing=False, activation_checkpointing_kwargs={"selective": True}
    )
    assert "checkpointing, which is off" in selective_off
    (reentrant,) = problems(CPU, gradient_checkpointing_kwargs={"selective": True, "use_reentrant": True})
    assert reentrant.startswith("training.gradient_checkpointing_kwargs.selective:") and "non-reentrant" in reentrant


def test_liger_on_an_architecture_it_does_not_patch(tiny_model_dir):
    from qlora_kit.resolve import memory_switch_problems

    llama = validate(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": [{"path": "x.jsonl"}]},
            "training": {"use_liger_kernel": True},
        }
    )
    (problem,) = memory_switch_problems(llama, H100, frozenset({"mistral", "qwen2"}))
    assert "no kernels for llama models" in problem and "mistral, qwen2" in problem
    assert memory_switch_problems(llama, H100, frozenset({"llama"})) == []


def test_preflight_refuses_offloading_on_cpu_in_one_line():
    with pytest.raises(UserError, match=r"^pre-flight check found a problem: training.activation_offloading: ") as err:
        launch.preflight(recipe(training={"activation_offloading": True}), Launch(), CPU)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="pre-flight check found 2 problems: .*offload.*use_liger_kernel"):
        launch.preflight(
            recipe(training={"use_liger_kernel": True, "activation_checkpointing_kwargs": {"offload": True}}),
            Launch(),
            CPU,
        )
