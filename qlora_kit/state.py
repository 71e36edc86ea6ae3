"""Save nested training state (optimiser, scheduler, RNG) without pickle.

A nested structure of dicts, lists, tuples, numbers, strings and tensors is split into
NAME.safetensors (every tensor, under a generated key) and NAME.json (the structure, with each
tensor replaced by its key). Dict keys keep their type (optimiser state is keyed by int).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import QLoraKitError


def _encode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensor = obj.detach().cpu().contiguous()
        # safetensors refuses aliased tensors; bitsandbytes' 8-bit optimisers share one code table
        # (qmap) among all parameters, which on CPU stays one storage. Each gets its own copy.
        if any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in tensors.values()):
            tensor = tensor.clone()
        tensors[key] = tensor
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save {type(obj).__name__} in training state")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_tree(tree, folder: str | Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors)
    folder = Path(folder)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_tree(folder: str | Path, name: str):
    """The structure `save_tree` wrote; a missing, truncated or mismatched pair of files is a QLoraKitError."""
    from safetensors import SafetensorError

    folder = Path(folder)
    try:
        tensors = load_file(str(folder / f"{name}.safetensors"))
        skeleton = json.loads((folder / f"{name}.json").read_text())
        return _decode(skeleton, tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise QLoraKitError(f"checkpoint {folder} is incomplete or corrupt ({name}: {reason})") from None
