"""Batches of packed rows that stay separate, for attention kernels that cannot read sequence boundaries.

trl's padding-free collator concatenates the whole batch into one row and marks where each example starts. A varlen
kernel (flash-attention) then attends within each example only, which is the cheapest layout there is. sdpa and
eager have no such kernel: transformers builds one dense block-diagonal mask over the whole concatenated row, so a
batch of 8 packed rows of 512 tokens costs (8 x 512)^2 attention scores instead of 8 x 512^2, eight times the work.

This collator keeps each packed row in its own batch slot instead (``resolve.packed_layout`` picks the layout):
``input_ids`` of shape (rows, longest row), ``position_ids`` restarting at every example, and no ``attention_mask``,
so transformers' masking utils derive a per-row block-diagonal causal mask from the position ids (each example
attends to itself only). Padding at the end of a short row is a segment of its own with labels -100, so it neither
attends to nor is attended by real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qlora_kit.data.tokens import IGNORE_INDEX


def restarting_positions(seq_lengths: list[int], row_length: int) -> torch.Tensor:
    """Positions 0..n-1 for each example of a packed row, then 0..k-1 for the k padding slots after it."""
    lengths = [n for n in seq_lengths if n > 0]
    padding = row_length - sum(lengths)
    return torch.cat([torch.arange(n) for n in [*lengths, padding] if n > 0])


@dataclass
class PackedRowsCollator:
    """(rows, longest row) batches of packed examples with per-example position ids; see the module docstring."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.empty((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = example["input_ids"]
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            labels[row, : len(ids)] = torch.as_tensor(example.get("labels", ids))
            positions[row] = restarting_positions(example.get("seq_lengths") or [len(ids)], width)
        # The first token of each example would be "predicted" from the end of the previous one: never train that.
        labels[positions == 0] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def real_token_count(inputs: dict[str, torch.Tensor], pad_token_id: int | None) -> int:
    """Tokens of real examples in a batch from any of the collators (padding excluded)."""
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    ids = inputs["input_ids"]
    # The pad token is never EOS and never produced by tokenizing text (tokenizer.ensure_pad_token).
    return int((ids != pad_token_id).sum()) if pad_token_id is not None else ids.numel()
