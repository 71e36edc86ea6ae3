"""Reading safetensors files: a model folder's shards, their headers, single tensors, whole small
files, and the one error a truncated or corrupt file gets.

Nothing here unpickles: a folder with only *.bin / *.pt weights is refused with the one-line
conversion that makes it readable.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import QLoraKitError, first_few


def unreadable(f: Path, e: Exception) -> QLoraKitError:
    return QLoraKitError(f"{f} is not a readable safetensors file ({e}); it may be truncated or corrupt: copy or "
                         "convert it again")


def safetensors_files(path: str | Path) -> list[Path]:
    """The model's safetensors shards, checked to be a model folder; a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise QLoraKitError(f"model path {str(path)!r} does not exist: give a local Hugging Face model folder")
    if path.is_file():
        raise QLoraKitError(f"{str(path)!r} is a file: give the model folder that holds config.json")
    if not (path / "config.json").is_file():
        raise QLoraKitError(f"{str(path)!r} is not a model folder: it has no config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        hint = (f" It has {first_few(pickled, 3)}: qlora_kit never unpickles; convert it once with "
                "transformers (model.save_pretrained(dir, safe_serialization=True)).") if pickled else ""
        raise QLoraKitError(f"{str(path)!r} has no *.safetensors weights.{hint}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise QLoraKitError(f"{str(path)!r} is missing shards listed in its index: {first_few(missing)}")
        files = [path / n for n in names]
    return files


@contextlib.contextmanager
def open_safetensors(f: Path, device: str = "cpu"):
    """safe_open (headers, single tensors), with a clear error for a truncated or corrupt file."""
    try:
        with safe_open(str(f), framework="pt", device=device) as handle:
            yield handle
    except SafetensorError as e:
        raise unreadable(f, e) from None
    except OSError as e:
        raise QLoraKitError(f"could not read {f}: {e}") from None


def iter_safetensors(files: list[Path], device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time, memory-mapped."""
    for f in files:
        with open_safetensors(f, device) as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


def count_tensors(files: list[Path]) -> int:
    total = 0
    for f in files:
        with open_safetensors(f) as handle:
            total += len(handle.keys())
    return total


def read_tensors(f: Path) -> dict[str, torch.Tensor]:
    """A whole (small) safetensors file: adapters, init factors, checkpoint state."""
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise unreadable(f, e) from None


class SourceWeights:
    """Memory-mapped access to single tensors of a model folder, by key (one tensor at a time)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        for f in safetensors_files(self.folder):
            with open_safetensors(f) as handle:
                for key in handle.keys():
                    self.where[key] = f

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise QLoraKitError(f"{self.folder} has no tensor {key}: is it the folder this model was loaded from?")
        with open_safetensors(self.where[key]) as handle:
            return handle.get_tensor(key)
