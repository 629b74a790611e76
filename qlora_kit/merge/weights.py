"""The streaming merge: plan every output tensor from the checkpoint header and the adapters, then produce and write
them one at a time, so memory holds one tensor (and the adapters), never the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qlora_kit.errors import UserError
from qlora_kit.merge.adapter import Adapter, merged_weight
from qlora_kit.merge.base import BaseLayout, roundtrip_4bit
from qlora_kit.merge.checkpoint import Checkpoint, ShardWriter, TensorSpec
from qlora_kit.recipe import Recipe
from qlora_kit.resolve import resolve


@dataclass
class MergePlan:
    """Every output tensor in write order, and where each comes from."""

    specs: list[TensorSpec]
    sources: dict[str, str]  # output name -> checkpoint tensor it starts from
    vocab_rows: int
    tied: bool
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs)


def check_adapters(adapters: list[Adapter], layout: BaseLayout) -> None:
    """Every tensor an adapter changes must exist in the base with a compatible shape."""
    embeddings = {layout.input_embedding, layout.output_embedding}
    for adapter in adapters:
        where = f"adapter {adapter.path}"
        for name, update in adapter.updates.items():
            shape = layout.shapes.get(name)
            if shape is None or len(shape) != 2:
                raise UserError(f"{where} does not match the base: it changes {name}, which the base model has not")
            rank_shape = (update.lora_B.shape[0], update.lora_A.shape[1])
            if rank_shape != shape or update.lora_A.shape[0] != update.lora_B.shape[1]:
                raise UserError(
                    f"{where} does not match the base: {name} is {shape} in the base but the adapter's "
                    f"LoRA pair makes {rank_shape}: was it trained on another model?"
                )
        for name, tensor in adapter.replacements.items():
            shape = layout.shapes.get(name)
            resized = name in embeddings and shape is not None and tensor.shape[1:] == shape[1:]
            if shape is None or (tuple(tensor.shape) != shape and not resized):
                raise UserError(
                    f"{where} does not match the base: it stores {name} {tuple(tensor.shape)}, the base "
                    f"has {shape if shape else 'no such tensor'}: was it trained on another model?"
                )


def check_checkpoint(checkpoint: Checkpoint, layout: BaseLayout) -> None:
    """The checkpoint must hold, under the model's own names and shapes, every tensor that is not tied."""
    for name, spec in checkpoint.specs.items():
        if name in layout.shapes and spec.shape != layout.shapes[name]:
            raise UserError(
                f"base checkpoint {checkpoint.folder}: {name} is {spec.shape} but its config.json makes "
                f"{layout.shapes[name]}; the checkpoint and config do not belong together"
            )
    missing = [name for name in layout.shapes if name not in checkpoint.specs and name not in layout.tied]
    if missing:
        raise UserError(
            f"base checkpoint {checkpoint.folder} lacks {missing[0]} (and {len(missing) - 1} more) under "
            "the model's own names: its layout needs transformers' conversion on load, which a streaming "
            "merge does not replicate"
        )


def _vocab_rows(checkpoint: Checkpoint, layout: BaseLayout, own: Adapter, tokenizer_len: int, notes: list) -> int:
    base_rows = layout.shapes[layout.input_embedding][0]
    saved = [t.shape[0] for n, t in own.replacements.items() if n in (layout.input_embedding, layout.output_embedding)]
    if saved:
        return max(saved)
    if tokenizer_len > base_rows:
        # Training resized the embeddings (load_base_model pads to a multiple of 64) but the adapter did not save
        # them; their new rows were random, so the merge gives them the mean of the trained rows.
        notes.append(
            f"vocabulary resized {base_rows} -> tokenizer {tokenizer_len}; new embedding rows set to the mean"
        )
        return -(-tokenizer_len // 64) * 64
    return base_rows


def _keeps_tie(target: str, source: str, adapters: list[Adapter]) -> bool:
    """A tied output embedding stays tied unless the adapters made it differ from the input embedding."""
    own = adapters[0]
    if any(target in a.updates or source in a.updates for a in adapters):
        return False
    if (target in own.replacements) != (source in own.replacements):
        return False
    return target not in own.replacements or torch.equal(own.replacements[target], own.replacements[source])


def plan_merge(
    checkpoint: Checkpoint, layout: BaseLayout, adapters: list[Adapter], out_dtype: torch.dtype, tokenizer_len: int
) -> MergePlan:
    """Decide every output tensor's name, shape and dtype, in the checkpoint's order."""
    check_checkpoint(checkpoint, layout)
    check_adapters(adapters, layout)
    notes: list[str] = []
    rows = _vocab_rows(checkpoint, layout, adapters[0], tokenizer_len, notes)
    embeddings = {layout.input_embedding, layout.output_embedding}
    sources = {name: name for name in checkpoint.specs}
    tied = bool(layout.tied)
    for target, source in layout.tied.items():
        if _keeps_tie(target, source, adapters):
            continue
        tied = False  # also when the checkpoint stores the tied copy: a tied config would drop the trained one
        if target not in checkpoint.specs:
            sources[target] = source
        notes.append(f"{target} untied from {source}: the adapter changed one of them")
    specs = []
    for name, source in sources.items():
        spec = checkpoint.specs[source]
        shape = (rows, *spec.shape[1:]) if name in embeddings else spec.shape
        specs.append(TensorSpec(name, shape, out_dtype if spec.dtype.is_floating_point else spec.dtype))
    return MergePlan(specs, sources, rows, tied, notes)


class WeightMerger:
    """Produces each planned tensor: base (dequantized or original) + adapter updates, in the output dtype."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        layout: BaseLayout,
        adapters: list[Adapter],
        recipe: Recipe,
        strategy: str,
        device: torch.device,
    ) -> None:
        self.checkpoint, self.layout, self.adapters = checkpoint, layout, adapters
        self.recipe, self.strategy, self.device = recipe, strategy, device
        self.load_dtype = resolve(recipe).weights_dtype
        self.counts = {"dequantized": 0, "lora": 0, "replaced": 0}

    def base(self, name: str, source: str) -> torch.Tensor:
        replacement = self.adapters[0].replacements.get(name)
        if replacement is not None:
            self.counts["replaced"] += 1
            return replacement
        tensor = self.checkpoint.read(source)
        if self.strategy != "dequantized" or not tensor.is_floating_point():
            return tensor
        if source in self.layout.quantized:
            self.counts["dequantized"] += 1
            return roundtrip_4bit(tensor, self.recipe, self.device)
        return tensor.to(self.load_dtype)  # as from_pretrained(dtype=...) loaded it

    def produce(self, spec: TensorSpec, source: str) -> torch.Tensor:
        tensor = self.base(spec.name, source)
        if tensor.dim() and tensor.shape[0] < spec.shape[0]:
            mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
            tensor = torch.cat([tensor, mean.expand(spec.shape[0] - tensor.shape[0], *tensor.shape[1:])])
        updates = [(a.updates[spec.name], a.weight) for a in self.adapters if spec.name in a.updates]
        if updates:
            self.counts["lora"] += 1
            owned = spec.name not in self.adapters[0].replacements  # never overwrite the adapter's own tensor
            tensor = merged_weight(tensor.to(self.device, torch.float32, copy=not owned), updates)
        return tensor.to(spec.dtype)


def stream_merge(plan: MergePlan, merger: WeightMerger, writer: ShardWriter, on_tensor=None) -> dict[str, int]:
    """Produce and write every planned tensor in order; return what was done to how many."""
    for spec in plan.specs:
        writer.write(spec.name, merger.produce(spec, plan.sources[spec.name]))
        if on_tensor is not None:
            on_tensor(spec)
    writer.close()
    return merger.counts
