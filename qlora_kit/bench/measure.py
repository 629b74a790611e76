"""Measuring one training side: per-step times and token counts, peak memory, MFU, the machine."""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import torch

from qlora_kit.data.collate import real_token_count
from qlora_kit.errors import UserError

SIDES = ("toolkit", "baseline")
# Dense bf16 tensor-core peaks (no sparsity), by the device name torch reports, for MFU.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "L4": 121e12,
    "RTX 4090": 165.2e12,
    "A10G": 70e12,
}


COUNTS = ("processed", "loss", "padded", "sequences")


class Meter:
    """Per-step wall time and token counts, recorded from the batches the loss is computed on."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.steps: list[dict[str, float]] = []
        self.pending = dict.fromkeys(COUNTS, 0)
        self.last = started

    def count(self, inputs: dict[str, Any], pad_token_id: int | None) -> None:
        for key, value in batch_tokens(inputs, pad_token_id).items():
            self.pending[key] += value

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepTimes(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                sync()
                meter.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                now = time.perf_counter()
                meter.steps.append({"seconds": now - meter.last, "since_start": now - meter.started, **meter.pending})
                meter.pending = dict.fromkeys(COUNTS, 0)
                meter.last = now

        return StepTimes()

    def attach(self, trainer) -> None:
        compute_loss = trainer.compute_loss

        pad_token_id = trainer.processing_class.pad_token_id

        def counting(model, inputs, *args, **kwargs):
            if model.training:
                self.count(inputs, pad_token_id)
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counting
        trainer.add_callback(self.callback())


def batch_tokens(inputs: dict[str, Any], pad_token_id: int | None) -> dict[str, int]:
    """One batch's counts, by the layout of the collator that built it (module docstring of qlora_kit.bench):

    - SFT (``input_ids``, ``labels``): real tokens, labelled tokens after the shift, positions, rows;
    - DPO and KTO (trl's ``input_ids`` + ``completion_mask``; KTO adds ``KL_input_ids``, the mismatched completions
      its KL estimate runs the policy on): real tokens of every sequence, completion tokens, positions, sequences;
    - ORPO and SimPO (``chosen_input_ids`` / ``rejected_input_ids``, concatenated into one batch padded to the longer
      of the two): the same counts for the chosen and the rejected sequences.
    """
    if "chosen_input_ids" in inputs:
        sides = [inputs[f"{side}_input_ids"] for side in ("chosen", "rejected")]
        width = max(ids.shape[1] for ids in sides)
        return {
            "processed": sum(int(inputs[f"{side}_attention_mask"].sum()) for side in ("chosen", "rejected")),
            "loss": sum(int((inputs[f"{side}_labels"][..., 1:] != -100).sum()) for side in ("chosen", "rejected")),
            "padded": sum(ids.shape[0] * width for ids in sides),
            "sequences": sum(ids.shape[0] for ids in sides),
        }
    if "completion_mask" in inputs:
        prefixes = ("", "KL_") if "KL_input_ids" in inputs else ("",)
        return {
            "processed": sum(int(inputs[f"{p}attention_mask"].sum()) for p in prefixes),
            "loss": int(inputs["completion_mask"][..., 1:].sum()),  # KTO's KL completions take no gradient
            "padded": sum(inputs[f"{p}input_ids"].numel() for p in prefixes),
            "sequences": sum(inputs[f"{p}input_ids"].shape[0] for p in prefixes),
        }
    return {
        "processed": real_token_count(inputs, pad_token_id),
        "loss": int((inputs["labels"][..., 1:] != -100).sum()),
        "padded": inputs["input_ids"].numel(),
        "sequences": inputs["input_ids"].shape[0],
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(meter: Meter, warmup: int) -> dict[str, Any]:
    """Throughput over the steps after warm-up; wall time to the end of the first optimizer step."""
    measured = meter.steps[warmup:]
    if not measured:
        raise UserError(f"--warmup-steps {warmup} leaves no step to measure: raise --steps")
    seconds = sum(s["seconds"] for s in measured)
    totals = {k: sum(s[k] for s in measured) for k in COUNTS}
    durations = sorted(s["seconds"] for s in measured)
    return {
        "measured_steps": len(measured),
        "warmup_steps": warmup,
        "seconds": seconds,
        "steps_per_second": len(measured) / seconds,
        "step_time_mean_s": seconds / len(measured),
        "step_time_median_s": durations[len(durations) // 2],
        "tokens_per_second": totals["processed"] / seconds,
        "loss_tokens_per_second": totals["loss"] / seconds,
        "padded_tokens_per_second": totals["padded"] / seconds,
        "tokens": totals,
        "padding_efficiency": totals["processed"] / max(totals["padded"], 1),
        "time_to_first_step_s": meter.steps[0]["since_start"],
    }


def peak_memory() -> dict[str, int]:
    if torch.cuda.is_available():
        return {
            "cuda_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "cuda_peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
        }
    return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def matmul_params(model) -> int:
    """Parameters of every linear layer (4-bit ones counted by their logical shape), lm_head included."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features
    return total


def mfu(tokens_per_second: float, params: int) -> float | None:
    """6N FLOPs per token over the GPU's dense bf16 peak; None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return 6 * params * tokens_per_second / peak if peak else None


def measured_quantized_bytes(model) -> int:
    """Bytes really held by 4-bit weights: packed codes plus every quantization-constant tensor, shared ones once."""
    import bitsandbytes as bnb

    storages: dict[int, int] = {}

    def add(tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            add(module.weight.data)
            for tensor in (state.absmax, state.code, state.offset):
                add(tensor)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
    return sum(storages.values())


def machine() -> dict[str, Any]:
    import platform

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info
