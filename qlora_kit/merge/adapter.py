"""Saved PEFT LoRA adapters, read into what a merge needs: per-weight low-rank updates and full replacements.

For a targeted linear weight W (out x in) and an adapter with matrices A (r x in), B (out x r):

- LoRA: W + s * B @ A, with s = alpha / r, or alpha / sqrt(r) with rsLoRA (alpha and r per module via peft's
  alpha_pattern and the stored shapes).
- DoRA: m / ||W + s * B @ A||_row * (W + s * B @ A), the row norm taken of the base the adapter was trained on,
  exactly as peft's DoRA forward computes it.

Several adapters combine linearly: W + sum_i w_i * (merged_i(W) - W), for LoRA W + sum_i w_i * s_i * B_i @ A_i, the
same as peft running the adapters together with each scaling multiplied by its weight. Full tensors an adapter
stores (``modules_to_save``, embeddings saved after a vocabulary resize, biases trained with ``bias: all``) replace
the base tensor outright.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora_kit.errors import UserError
from qlora_kit.model import check_adapter_files, read_adapter_config

PEFT_PREFIX = "base_model.model."
UNSUPPORTED_CONFIG = {
    "lora_bias": "a trained bias on lora_B",
    "trainable_token_indices": "trainable token indices",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters",
}


@dataclass
class LoraUpdate:
    """One adapter's low-rank update of one base weight."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA

    def add_to(self, result: torch.Tensor, weight: torch.Tensor, scale: float) -> None:
        """Add ``scale`` times this update of ``weight`` (float32, out x in) to ``result``, in place."""
        lora_A, lora_B = self.lora_A.to(weight.device, torch.float32), self.lora_B.to(weight.device, torch.float32)
        if self.magnitude is None:
            result.addmm_(lora_B, lora_A, alpha=scale * self.scaling)  # one fused step, no out x in temporaries
            return
        updated = torch.addmm(weight, lora_B, lora_A, alpha=self.scaling)
        # DoRA's row norm is a constant of the trained model (peft detaches it), so the merge is exact.
        updated *= (self.magnitude.to(weight.device, torch.float32) / torch.linalg.norm(updated, dim=1)).view(-1, 1)
        result.add_(updated.sub_(weight), alpha=scale)


@dataclass
class Adapter:
    """A saved adapter: where it is, its weight in the merge, its updates keyed by base weight name."""

    path: Path
    weight: float
    config: dict
    updates: dict[str, LoraUpdate] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def uses_dora(self) -> bool:
        return any(update.magnitude is not None for update in self.updates.values())

    @property
    def nbytes(self) -> int:
        tensors = [t for u in self.updates.values() for t in (u.lora_A, u.lora_B, u.magnitude) if t is not None]
        return sum(t.numel() * t.element_size() for t in [*tensors, *self.replacements.values()])


def adapter_dir(path: Path) -> Path:
    """The adapter folder of a run directory, or the folder itself when it is an adapter."""
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise UserError(
        f"no adapter in {path}: expected {path}/adapter/adapter_config.json (a run directory from "
        "`qlora-kit train`) or a PEFT adapter folder"
    )


def load_adapter(path: Path, weight: float, label: str) -> Adapter:
    """Read an adapter's config and weights and group them by the base weight they change."""
    from safetensors.torch import load_file

    folder = adapter_dir(path)
    config = read_adapter_config(folder)
    _check_config(config, folder, label)
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise UserError(f"{label}: {folder} has no adapter_model.safetensors (merge reads safetensors adapters only)")
    check_adapter_files(folder)
    adapter = Adapter(folder, weight, config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_file).items():
        name = key.removeprefix(PEFT_PREFIX)
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector.weight", ".lora_magnitude_vector"):
            if name.endswith(suffix):
                parts.setdefault(name.removesuffix(suffix), {})[suffix.split(".")[1]] = tensor
                break
        else:
            if "lora_" in name:
                raise UserError(f"{label}: adapter tensor {key} is of a LoRA kind merge does not handle")
            if ".original_module." in name:
                continue  # the untrained copy peft keeps beside a modules_to_save module (saved with resized vocab)
            adapter.replacements[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = tensor
    for module, tensors in parts.items():
        adapter.updates[f"{module}.weight"] = _update(module, tensors, config, label)
    return adapter


def _check_config(config: dict, folder: Path, label: str) -> None:
    if config.get("peft_type") != "LORA":
        raise UserError(f"{label}: {folder} holds a {config.get('peft_type')} adapter; merge handles LoRA adapters")
    for key, what in UNSUPPORTED_CONFIG.items():
        if config.get(key):
            raise UserError(f"{label}: the adapter in {folder} uses {what} ({key}), which merge does not handle")
    if config.get("fan_in_fan_out"):
        raise UserError(
            f"{label}: the adapter in {folder} targets Conv1D layers (fan_in_fan_out), which merge does not handle"
        )


def _update(module: str, tensors: dict[str, torch.Tensor], config: dict, label: str) -> LoraUpdate:
    from peft.utils.other import get_pattern_key

    if "lora_A" not in tensors or "lora_B" not in tensors:
        raise UserError(f"{label}: the adapter has only part of the LoRA pair for {module}; it is damaged")
    rank = tensors["lora_A"].shape[0]
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraUpdate(tensors["lora_A"], tensors["lora_B"], scaling, tensors.get("lora_magnitude_vector"))


def check_combination(adapters: list[Adapter]) -> None:
    """Refuse combinations whose merged result would not be what peft computes with the adapters together."""
    own = adapters[0]
    for index, extra in enumerate(adapters[1:]):
        if extra.replacements:
            names = ", ".join(sorted(extra.replacements)[:3])
            raise UserError(
                f"merge.adapters.{index}: {extra.path} stores full modules ({names}); only the run's own "
                "adapter may (modules_to_save cannot be combined with weights)"
            )
    if any(a.uses_dora for a in adapters) and (len(adapters) > 1 or own.weight != 1):
        raise UserError(
            "merge.adapters: DoRA adapters merge alone and with weight 1 (DoRA is not linear in its "
            "update, so a weighted combination has no single meaning)"
        )


def merged_weight(weight: torch.Tensor, updates: list[tuple[LoraUpdate, float]]) -> torch.Tensor:
    """``weight`` (float32, which this may overwrite) plus the weighted updates of every adapter that changes it."""
    # DoRA reads the unmerged weight, so it needs a separate result; plain LoRA adds in place.
    result = weight.clone() if any(update.magnitude is not None for update, _ in updates) else weight
    for update, scale in updates:
        update.add_to(result, weight, scale)
    return result
