"""Safetensors checkpoints read and written one tensor at a time, so memory stays near one tensor, not one file.

safetensors' own API maps a whole file (every touched page then counts in the process's resident memory until the
file is closed) and writes a whole dict at once. The format is simple (8-byte little-endian header length, a JSON
header of dtype/shape/byte offsets, then the raw bytes), so here a tensor is read with one ``readinto`` at its offset,
and an output shard's header is written first (every output shape and dtype is known before merging), after which
each merged tensor is appended the moment it exists. Files written here load with safetensors and transformers.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.errors import UserError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor, and for a stored one where its bytes are."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path | None = None
    begin: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where tensor data starts."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(
            f"{path} is not a readable safetensors file ({exc}): re-download or re-save the model"
        ) from None
    return header, 8 + length


class Checkpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint, in file and offset order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = self._files(folder)
        self.specs: dict[str, TensorSpec] = {}
        self.file_sizes = {path: path.stat().st_size for path in self.files}
        for path in self.files:
            header, start = read_header(path)
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                if info["dtype"] not in DTYPES:
                    raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which merge cannot read")
                self.specs[name] = TensorSpec(
                    name, tuple(info["shape"]), DTYPES[info["dtype"]], path, start + info["data_offsets"][0]
                )

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
        elif (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
        else:
            found = "pickle (.bin) weights" if list(folder.glob("*.bin")) else "no weights"
            raise UserError(
                f"base model {folder} has {found}: merge streams safetensors checkpoints only (load and "
                "save_pretrained the model once to convert it)"
            )
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise UserError(f"base model {folder}: shard {missing[0]} named in {INDEX_NAME} is missing")
        return files

    @property
    def largest_file_bytes(self) -> int:
        return max(self.file_sizes.values())

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read into fresh memory (no mapping of the file stays behind)."""
        spec = self.specs[name]
        buffer = torch.empty(spec.nbytes, dtype=torch.uint8)
        with spec.file.open("rb") as handle:
            handle.seek(spec.begin)
            if handle.readinto(buffer.numpy()) != spec.nbytes:
                raise UserError(f"{spec.file} is truncated: tensor {name} is incomplete; re-download the model")
        return buffer.view(spec.dtype).reshape(spec.shape)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(text)
    except ValueError:
        raise UserError(f"merge.max_shard_size: {text!r} is not a size: write e.g. 5GB or 500MB") from None


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most ``max_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' names: model.safetensors, or model-00001-of-00003.safetensors and so on."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Writes planned shards in order: each header up front, then each tensor's bytes as it arrives."""

    def __init__(self, folder: Path, shards: list[list[TensorSpec]]) -> None:
        self.folder = folder
        self.shards = shards
        self.names = shard_names(len(shards))
        self.queue = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self.position = 0
        self.handle = None
        self.open_index = -1

    def write_index(self) -> None:
        if len(self.shards) == 1:
            return
        weight_map = {spec.name: self.names[i] for i, shard in enumerate(self.shards) for spec in shard}
        total = sum(spec.nbytes for shard in self.shards for spec in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def _open(self, index: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[index]:
            header[spec.name] = {
                "dtype": NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
        self.handle = (self.folder / self.names[index]).open("wb")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)
        self.open_index = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan; names, shapes and dtypes must come exactly as planned."""
        index, spec = self.queue[self.position]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"merge wrote {name} {tuple(tensor.shape)} {tensor.dtype}, planned {spec}")
        if index != self.open_index:
            self._open(index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.handle.write(data.numpy().data)
        self.position += 1

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.position != len(self.queue):
            raise RuntimeError(f"merge wrote {self.position} of {len(self.queue)} planned tensors")
        self.write_index()
