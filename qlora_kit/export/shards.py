"""safetensors files, header first: the base's tensor headers, the export's shard plan, a writer that
appends one tensor at a time, and the side files that make a folder loadable.

Why our own shard writer instead of safetensors' `save_file`: `save_file` takes a dict, so a 2 GB
shard would sit in memory before it is written. A safetensors file is an 8-byte header length, a
JSON header of names, dtypes, shapes and byte offsets, then the raw bytes; every shape and dtype is
known from the base's headers before any tensor is computed, so each shard's header is written
first and tensors are appended as they are merged. safetensors reads the result (the verification
loads it with transformers, the tests with `safetensors.torch.load_file`).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from pathlib import Path

import torch

from ..errors import QLoraKitError
from ..dtypes import dtype_name
from ..tensorfiles import open_safetensors

Entry = tuple[str, tuple[int, ...], torch.dtype]  # (key, shape, dtype) of one tensor

# Files besides the weights that make a folder usable: tokenizer, generation defaults, remote code, licence.
SIDE_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
              "vocab.*", "merges.txt", "chat_template.*", "*.tiktoken", "*.py", "LICENSE*", "NOTICE*")
INDEX_NAME = "model.safetensors.index.json"
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def read_headers(files: list[Path]) -> list[Entry]:
    """(key, shape, dtype) of every tensor in `files`, in file order, read from the headers only."""
    plan = []
    for f in files:
        with open_safetensors(f) as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                dt = _ST_NAMES.get(view.get_dtype())
                if dt is None:
                    raise QLoraKitError(f"{f}: tensor {key} has dtype {view.get_dtype()}, which the "
                                        "exporter does not handle")
                plan.append((key, tuple(view.get_shape()), dt))
    return plan


def parse_size(value: int | str) -> int:
    """Bytes from 2000000, '2GB' (10^9) or '2GiB' (2^30), as Hugging Face's max_shard_size reads them."""
    if isinstance(value, int) and value > 0:
        return value
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number):] or "B"
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except (ValueError, KeyError, OverflowError):  # OverflowError: 'inf'
        size = 0
    if size <= 0:
        raise QLoraKitError(f"max shard size {value!r} is not a size: write it like '2GB', '500MB' or '4GiB'")
    return size


# ---------------------------------------------------------------- planning

def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of one tensor's data."""
    return math.prod(shape) * (torch.finfo(dtype).bits if dtype.is_floating_point else
                               (8 if dtype == torch.bool else torch.iinfo(dtype).bits)) // 8


def plan_shards(plan: list[Entry], dtype: torch.dtype, limit: int) -> list[list[Entry]]:
    """Consecutive groups of at most `limit` bytes (a bigger tensor gets a shard of its own), each
    entry with the dtype it is written in: `dtype` for floating-point tensors, others as stored."""
    shards, current, size = [], [], 0
    for key, shape, src in plan:
        out = dtype if src.is_floating_point else src
        n = nbytes(shape, out)
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape, out))
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def total_bytes(shards: list[list[Entry]]) -> int:
    """Bytes of tensor data in all shards (headers aside), as the index's total_size counts them."""
    return sum(nbytes(shape, dt) for entries in shards for _, shape, dt in entries)


def shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


# ---------------------------------------------------------------- writing

class ShardWriter:
    """One safetensors file written front to back: header from the planned entries, then raw bytes."""

    def __init__(self, path: Path, entries: list[Entry]):
        if sys.byteorder != "little":
            raise QLoraKitError("safetensors files are little-endian; this exporter needs a little-endian CPU")
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape, dt in entries:
            n = nbytes(shape, dt)
            header[key] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
        self.path, self.pending = path, list(entries)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)))
        self.file.write(blob)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, shape, dt = self.pending.pop(0)
        if key != want_key or tuple(tensor.shape) != shape or tensor.dtype != dt:
            raise RuntimeError(f"shard writer expected {want_key} {shape} {dt}, got {key} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        self.file.write(flat.view(torch.uint8).numpy() if flat.numel() else b"")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        self.file.close()
        if kind is None and self.pending:
            raise RuntimeError(f"{self.path}: {len(self.pending)} planned tensors were never written")


def write_index(folder: Path, shards: list[list[Entry]]) -> None:
    """model.safetensors.index.json, which tells transformers which shard holds each tensor."""
    weight_map = {key: shard_name(i, len(shards)) for i, entries in enumerate(shards) for key, _, _ in entries}
    index = {"metadata": {"total_size": total_bytes(shards)}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def copy_side_files(base: Path, out: Path, dtype: torch.dtype) -> None:
    """config.json without quantization_config and with the export dtype; tokenizer and friends as they are."""
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for pattern in SIDE_FILES:
        for f in base.glob(pattern):
            if f.is_file() and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
