"""What to merge, settled from headers before the first weight is read.

    the base's safetensors headers   ->  plan: (key, shape, dtype) of every tensor, in file order
    the adapter's lora_A / lora_B    ->  pairs: {base weight key: (A, B)}, each checked to fit its weight
    an empty meta-device model       ->  quantised: the weights the loader quantises
    the adapter's record             ->  quant: the quantisation it was trained on, and where that came from

Both writers (safetensors shards, GGUF) share one MergeJob and differ only in how they store each
merged tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from ..adapters import Adapter
from ..dtypes import as_dtype, dtype_name
from ..errors import QLoraKitError
from ..loading import build_empty_model, load_config
from ..lora import ChangedBase, LoraConfig
from ..models import resolve_model_path
from ..modeltree import linear_layer_names
from ..moe import ExpertLayout, peft_paths
from ..quant import QuantConfig
from ..tensorfiles import SourceWeights, iter_safetensors, safetensors_files
from .merge import MERGE_BASES, ExpertMerge, Merger
from .shards import Entry, read_headers


@dataclass
class MergeJob:
    """Everything known before the first tensor is merged: the base's files and tensor headers, the
    adapter's A/B pairs, and the merge base."""

    base: Path
    adapter: Path
    files: list[Path]
    plan: list[Entry]  # (key, shape, stored dtype), in file order
    lora: LoraConfig
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    quant: QuantConfig | None
    quant_source: str
    merge_into: str  # the base actually used ("original" when the adapter was trained unquantised)
    requested_merge_into: str
    quantised: set[str]
    states: dict[str, ChangedBase]  # {weight key: how the init changed its base} for svd/loftq adapters
    experts: ExpertMerge | None = None  # mixture-of-experts checkpoints: per-expert tensors and expert adapters

    def merged_tensors(self, dtype: torch.dtype, norms: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, merged tensor in `dtype`) for every base tensor in file order, one at a time."""
        merger = Merger(self.pairs, self.lora, self.quant, self.quantised, self.merge_into, dtype, self.states,
                        self.experts)
        for key, tensor in iter_safetensors(self.files):
            yield key, merger.merged(key, tensor, norms)

    def summary(self) -> dict:
        return {"merge_into": self.merge_into, "requested_merge_into": self.requested_merge_into,
                "quant": self.quant.to_dict() if self.quant is not None else None, "quant_source": self.quant_source,
                "lora": {"r": self.lora.r, "alpha": self.lora.alpha, "rslora": self.lora.rslora,
                         "scale": self.lora.scale, "init": self.lora.init},
                "adapted_modules": len(self.pairs) + (len(self.experts.pairs) if self.experts else 0)}


def prepare_merge(base: str | Path, adapter: str | Path, merge_into: str = "dequantized",
                  quant: QuantConfig | None = None, compute_dtype: str | torch.dtype | None = None) -> MergeJob:
    """Read headers and the adapter, check they fit, and settle the merge base; no weights are read."""
    if merge_into not in MERGE_BASES:
        raise QLoraKitError(f"merge_into={merge_into!r}: use 'dequantized' (the base the adapter was "
                            "trained on) or 'original' (the base folder's own weights)")
    base, adapter = resolve_model_path(base), Path(adapter)
    files = safetensors_files(base)
    record = Adapter.read(adapter)
    plan = read_headers(files)
    model = build_empty_model(load_config(base), torch.float32)
    quantised = quantised_keys(base, model)
    quant, quant_source = _merge_quant(record, quant, compute_dtype, _stored_dtype(plan, quantised))
    if quant is None:
        quantised = set()
    layout = ExpertLayout(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for key, shape, _ in plan:
        name, piece = layout.locate(key)
        if piece is None and name.endswith(".weight"):
            shapes[name.removesuffix(".weight")] = shape
    peft_to_param = {}  # PEFT's expert adapter path -> the fused parameter it adapts
    for name, module in layout.experts.items():
        for param, path in peft_paths(name, list(module._parameters)).items():
            shapes[path] = tuple(module._parameters[param.rpartition(".")[2]].shape)
            peft_to_param[path] = param
    fits = record.check_fits(shapes, "base model")
    pairs = {module + ".weight": ab for module, ab in fits.items() if module not in peft_to_param}
    states = {module + ".weight": changed for module, changed in record.changed.items()}
    experts = None
    if layout.experts:
        expert_pairs = {peft_to_param[m]: ab for m, ab in fits.items() if m in peft_to_param}
        experts = ExpertMerge(layout, [key for key, _, _ in plan], expert_pairs, SourceWeights(base))
    return MergeJob(base, adapter, files, plan, record.lora, pairs, quant, quant_source,
                    merge_into if quant is not None else "original", merge_into, quantised, states, experts)


def quantised_keys(base: Path, model=None) -> set[str]:
    """Weights the loader quantises (every decoder linear layer), found on an empty meta-device model
    (built from `base`'s config unless given). Expert weights are quantised too, by ExpertMerge's rules."""
    model = model if model is not None else build_empty_model(load_config(base), torch.float32)
    return {name + ".weight" for name in linear_layer_names(model)}


def progress_bar(total: int, enabled: bool):
    """The bar a writer shows while it merges `total` tensors (a tqdm bar, gone once it closes)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="merging", unit="tensor", disable=not enabled, leave=False)


def _merge_quant(record: Adapter, override: QuantConfig | None, compute_dtype: str | torch.dtype | None,
                 stored: torch.dtype) -> tuple[QuantConfig | None, str]:
    """The quantisation the adapter was trained on, and where that knowledge came from.

    Never this machine's 'auto': the dtype a weight was cast to before quantising decides the base's
    bits, and an export must not depend on which machine runs it. In order: `compute_dtype` (the
    caller's word), the adapter's record, else the checkpoint's stored dtype, which is what a
    transformers BitsAndBytesConfig load quantises from (its dtype defaults to 'auto', the checkpoint's)."""
    if override is not None:
        quant, source = override, "argument"
    elif not record.quant_recorded:
        quant, source = QuantConfig(), "assumed (adapter has no qlora_kit metadata): NF4 + double quant, blocksize 64"
    elif record.quant is None:
        return None, "adapter trained on an unquantised base"
    else:
        quant, source = record.quant, "adapter"
    if compute_dtype is not None and compute_dtype != "auto":
        dtype = as_dtype(compute_dtype, "compute dtype")
        return replace(quant, compute_dtype=dtype), f"{source}; quantised from {dtype_name(dtype)} (compute dtype argument)"
    if quant.compute_dtype == "auto":
        return (replace(quant, compute_dtype=stored),
                f"{source}; quantised from the checkpoint's stored dtype {dtype_name(stored)}, as a transformers "
                "BitsAndBytesConfig load does (pass --compute-dtype if the base was loaded in another dtype)")
    return quant, source


def _stored_dtype(plan: list[Entry], quantised: set[str]) -> torch.dtype:
    """The dtype the checkpoint stores its quantisable weights in (the most common one)."""
    counts: dict[torch.dtype, int] = {}
    for key, _, dt in plan:
        if key in quantised and dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32
