"""Streaming merged export: base checkpoint + LoRA adapter -> a plain Hugging Face folder.

    for each tensor of the base, in file order (memory-mapped, one at a time):
        W  = the merge base:  dequant(quant(W))  as the adapter saw it during training  ("dequantized")
                           or W as stored in the base folder                            ("original")
        W += scale * B @ A    (fp32, lora_delta: the same formula as the forward pass)
        write W in the export dtype into the current shard

Memory holds one tensor and its fp32 copy, never the model, so a 70B merge fits in a few GiB.

Why our own shard writer instead of safetensors' `save_file`: `save_file` takes a dict, so a 2 GB
shard would sit in memory before it is written. A safetensors file is an 8-byte header length, a
JSON header of names, dtypes, shapes and byte offsets, then the raw bytes; every shape and dtype is
known from the base's headers before any tensor is computed, so each shard's header is written
first and tensors are appended as they are merged. safetensors reads the result (the verification
loads it with transformers, the tests with `safetensors.torch.load_file`).

Adapters whose init changed the base (svd, loftq; see qlora_kit.inits) carry the factors that
rebuild it: "dequantized" then merges into dequant(quant(W - scale * B_off @ A_off)), the base the
adapter trained on, and "original" into W - scale * B0 @ A0 (B0, A0: the adapter's initial value), so
that it adds exactly what training changed to the original weights (for PiSSA without quantisation
that is the trained model itself; PEFT converts PiSSA adapters the same way).

Why "dequantized" is the default: the adapter was trained against dequant(quant(W)), not against W,
so merging into that base reproduces the fine-tuned model; merging into the original weights adds
back the quantisation error the adapter learned around. The report measures both.
"""

from __future__ import annotations

import fnmatch
import json
import math
import shutil
import struct
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from .adapters import Adapter
from .dtypes import as_dtype, dtype_name
from .errors import QLoraKitError, first_few
from .io import (atomic_dir, check_free, check_replace, disk_full_as_error, human_bytes, refuse_overlap,
                 unknown_entries)
from .loading import build_empty_model, load_config
from .lora import ChangedBase, LoraConfig, lora_delta
from .modeltree import linear_layer_names
from .models import model_location, resolve_model_path
from .inits import residual
from .quant import QuantConfig, roundtrip
from .tensorfiles import iter_safetensors, open_safetensors, safetensors_files

MERGE_BASES = ("dequantized", "original")
EXPORT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Files besides the weights that make a folder usable: tokenizer, generation defaults, remote code, licence.
SIDE_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
              "vocab.*", "merges.txt", "chat_template.*", "*.tiktoken", "*.py", "LICENSE*", "NOTICE*")
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
DISK_MARGIN = 64 * 2**20


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


def export_merged(base: str | Path, adapter: str | Path, out: str | Path, dtype: str | torch.dtype = "bf16",
                  merge_into: str = "dequantized", max_shard_size: int | str = "2GB", overwrite: bool = False,
                  verify: bool = True, quant: QuantConfig | None = None, progress: bool = True,
                  on_shard: Callable[[int, int, Path], None] | None = None,
                  compute_dtype: str | torch.dtype | None = None) -> dict:
    """Merge `adapter` into the base model folder `base` and write a Hugging Face folder at `out`.

    dtype: bf16, fp16 or fp32 for the written weights (the merge itself is always fp32).
    merge_into: "dequantized" (the quantised base the adapter was trained on; default) or "original".
    quant: the base's quantisation, when the adapter's own metadata should not be used (PEFT adapters
        carry none; then NF4 + double quant, blocksize 64, bitsandbytes' usual setup, is assumed).
    compute_dtype: the dtype the base's weights were cast to before quantising (qlora_kit: its compute
        dtype). Default: the adapter's record; for adapters without one the checkpoint's stored dtype,
        as transformers loads it. Never this machine's 'auto', so every machine writes the same bytes.
    verify: reload the export with transformers (no missing or unexpected keys) and compare its logits
        with the adapter running on the quantised base; needs the model in fp32 in memory once.
    on_shard: called as on_shard(index, count, path) after each shard is written.
    Writes atomically: `out` appears complete and verified, or not at all. overwrite replaces only an
    earlier qlora_kit export (a folder with its report.json), and only once the new one is complete;
    `out` may never be, contain or lie inside `base` or `adapter`. Returns the report also saved as
    out/report.json and out/report.txt.
    """
    started = time.perf_counter()
    dtype = as_dtype(dtype, "export dtype")
    if dtype not in EXPORT_DTYPES:
        raise QLoraKitError(f"export dtype {dtype_name(dtype)} is not supported: use bf16, fp16 or fp32")
    shard_limit = parse_size(max_shard_size)
    out = Path(out)
    check_export_target(out, base, adapter, overwrite)
    job = prepare_merge(base, adapter, merge_into, quant, compute_dtype)
    base, adapter, files, plan = job.base, job.adapter, job.files, job.plan
    shards = _shard(plan, dtype, shard_limit)
    out_bytes = sum(_nbytes(shape, _out_dtype(src, dtype)) for _, shape, src in plan)
    _check_disk(out, out_bytes)

    norms: dict[str, dict] = {}
    with disk_full_as_error(out.parent, out_bytes + DISK_MARGIN, "the export", DISK_ADVICE), \
            atomic_dir(out, overwrite=overwrite) as tmp:
        source = job.merged_tensors(dtype, norms)
        with _progress(len(plan), progress) as bar:
            for index, entries in enumerate(shards):
                name = _shard_name(index, len(shards))
                with _ShardWriter(tmp / name, entries) as writer:
                    for key, _, _ in entries:
                        src_key, tensor = next(source)
                        assert src_key == key, (src_key, key)
                        writer.write(key, tensor)
                        bar.update(1)
                if on_shard is not None:
                    on_shard(index, len(shards), tmp / name)
        if len(shards) > 1:
            weight_map = {key: _shard_name(i, len(shards)) for i, entries in enumerate(shards) for key, _, _ in entries}
            index_json = {"metadata": {"total_size": out_bytes}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
        _copy_side_files(base, tmp, dtype)
        merged_s = time.perf_counter() - started

        report = {
            "base": str(base), "adapter": str(adapter), "out": str(out),
            "dtype": dtype_name(dtype), **job.summary(),
            "tensors": len(plan), "shards": len(shards),
            "base_bytes": sum(f.stat().st_size for f in files), "out_bytes": out_bytes,
            "delta_norms": norms, "verify": None,
        }
        if verify:
            report["verify"] = verify_export(tmp, base, adapter, job.quant, dtype, job.merge_into, files, job.pairs,
                                             job.lora, job.states)
        report["times_s"] = {"merge": round(merged_s, 3), "verify": round(time.perf_counter() - started - merged_s, 3),
                             "total": round(time.perf_counter() - started, 3)}
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.txt").write_text(format_report(report))
    return report


# ---------------------------------------------------------------- where it may be written

REPORT_KEYS = ("base", "adapter", "merge_into")


def check_export_target(out: Path, base: str | Path, adapter: str | Path, overwrite: bool,
                        ours: Callable[[Path], bool] | None = None, what: str = "") -> bool:
    """Refuse an `out` that would destroy anything: the inputs, or something qlora_kit did not write.
    True when `out` holds an earlier export that the new one will replace."""
    refuse_overlap(out, {"base model folder": model_location(base), "adapter folder": adapter}, "--out")
    return check_replace(out, overwrite, ours or is_export_folder,
                         what or "a qlora_kit export (a folder with the exporter's report.json and nothing else)",
                         folder=ours is None)


def is_export_folder(folder: Path) -> bool:
    """A folder `export_merged` wrote: its report.json, and only the files an export holds."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict) or not all(k in report for k in REPORT_KEYS):
        return False
    patterns = ("model*.safetensors", "model.safetensors.index.json", "config.json", "report.json", "report.txt",
                *SIDE_FILES)
    return not unknown_entries(folder, lambda name: any(fnmatch.fnmatch(name, pat) for pat in patterns))


# ---------------------------------------------------------------- what to merge

@dataclass
class MergeJob:
    """Everything known before the first tensor is merged: the base's files and tensor headers, the
    adapter's A/B pairs, and the merge base. Writers (safetensors shards, GGUF) share it and differ
    only in how they store each merged tensor."""

    base: Path
    adapter: Path
    files: list[Path]
    plan: list[tuple[str, tuple[int, ...], torch.dtype]]  # (key, shape, stored dtype), in file order
    lora: LoraConfig
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    quant: QuantConfig | None
    quant_source: str
    merge_into: str  # the base actually used ("original" when the adapter was trained unquantised)
    requested_merge_into: str
    quantised: set[str]
    states: dict[str, ChangedBase]  # {weight key: how the init changed its base} for svd/loftq adapters

    def merged_tensors(self, dtype: torch.dtype, norms: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, merged tensor in `dtype`) for every base tensor in file order, one at a time."""
        merger = _Merger(self.pairs, self.lora, self.quant, self.quantised, self.merge_into, dtype, self.states)
        for key, tensor in iter_safetensors(self.files):
            yield key, merger.merged(key, tensor, norms)

    def summary(self) -> dict:
        return {"merge_into": self.merge_into, "requested_merge_into": self.requested_merge_into,
                "quant": self.quant.to_dict() if self.quant is not None else None, "quant_source": self.quant_source,
                "lora": {"r": self.lora.r, "alpha": self.lora.alpha, "rslora": self.lora.rslora,
                         "scale": self.lora.scale, "init": self.lora.init},
                "adapted_modules": len(self.pairs)}


def prepare_merge(base: str | Path, adapter: str | Path, merge_into: str = "dequantized",
                  quant: QuantConfig | None = None, compute_dtype: str | torch.dtype | None = None) -> MergeJob:
    """Read headers and the adapter, check they fit, and settle the merge base; no weights are read."""
    if merge_into not in MERGE_BASES:
        raise QLoraKitError(f"merge_into={merge_into!r}: use 'dequantized' (the base the adapter was "
                            "trained on) or 'original' (the base folder's own weights)")
    base, adapter = resolve_model_path(base), Path(adapter)
    files = safetensors_files(base)
    record = Adapter.read(adapter)
    plan = _plan(files)
    quantised = _quantised_keys(base)
    quant, quant_source = _merge_quant(record, quant, compute_dtype, _stored_dtype(plan, quantised))
    if quant is None:
        quantised = set()
    shapes = {key.removesuffix(".weight"): shape for key, shape, _ in plan if key.endswith(".weight")}
    pairs = {module + ".weight": ab for module, ab in record.check_fits(shapes, "base model").items()}
    states = {module + ".weight": changed for module, changed in record.changed.items()}
    return MergeJob(base, adapter, files, plan, record.lora, pairs, quant, quant_source,
                    merge_into if quant is not None else "original", merge_into, quantised, states)


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


def _stored_dtype(plan, quantised: set[str]) -> torch.dtype:
    """The dtype the checkpoint stores its quantisable weights in (the most common one)."""
    counts: dict[torch.dtype, int] = {}
    for key, _, dt in plan:
        if key in quantised and dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def _plan(files: list[Path]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(key, shape, dtype) of every base tensor, in file order, read from the headers only."""
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


def _quantised_keys(base: Path) -> set[str]:
    """Weights the loader quantises (every decoder linear layer), found on an empty meta-device model."""
    model = build_empty_model(load_config(base), torch.float32)
    return {name + ".weight" for name in linear_layer_names(model)}


class _Merger:
    """Turns one base tensor into the tensor to write: merge base, + adapter delta in fp32, cast."""

    def __init__(self, pairs, lora: LoraConfig, quant: QuantConfig | None, quantised: set[str],
                 merge_into: str, dtype: torch.dtype, states: dict | None = None):
        self.pairs, self.scale, self.quant = pairs, lora.scale, quant
        self.quantised, self.merge_into, self.dtype = quantised, merge_into, dtype
        self.states = states or {}  # {weight key: ChangedBase} for bases an svd/loftq init changed

    def base_weight(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The merge base for `key`: what the trained model computed with, or the stored weight."""
        state = self.states.get(key)
        if state is not None and (self.merge_into == "original" or self.quant is None):
            return residual(tensor, *state.start, self.scale, torch.float32)
        if self.merge_into == "original" or self.quant is None:
            return tensor
        if state is not None:  # the same arithmetic as the init and load_adapter: bit-identical base
            seen = residual(tensor, *state.offset, self.scale, self.quant.compute_dtype)
            return roundtrip(seen, self.quant) if key in self.quantised else seen
        seen = tensor.to(self.quant.compute_dtype)  # the loader casts before quantising
        return roundtrip(seen, self.quant) if key in self.quantised else seen

    def merged_fp32(self, key: str, tensor: torch.Tensor, norms: dict | None = None) -> torch.Tensor:
        w = self.base_weight(key, tensor).float()
        a, b = self.pairs[key]
        delta = lora_delta(a, b, self.scale)
        if norms is not None:
            module = key.removesuffix(".weight")
            d, n = _fro(delta), _fro(w)
            norms[module] = {"delta": d, "weight": n, "relative": d / max(n, 1e-30)}
        return w.add_(delta)

    def merged(self, key: str, tensor: torch.Tensor, norms: dict | None = None) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        if key in self.pairs:
            return self.merged_fp32(key, tensor, norms).to(self.dtype)
        return self.base_weight(key, tensor).to(self.dtype)


def _fro(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


# ---------------------------------------------------------------- writing

def _out_dtype(src: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return dtype if src.is_floating_point else src


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * (torch.finfo(dtype).bits if dtype.is_floating_point else
                               (8 if dtype == torch.bool else torch.iinfo(dtype).bits)) // 8


def _shard(plan, dtype: torch.dtype, limit: int) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Consecutive groups of at most `limit` bytes (a bigger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for key, shape, src in plan:
        out = _out_dtype(src, dtype)
        n = _nbytes(shape, out)
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape, out))
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class _ShardWriter:
    """One safetensors file written front to back: header from the planned entries, then raw bytes."""

    def __init__(self, path: Path, entries):
        if sys.byteorder != "little":
            raise QLoraKitError("safetensors files are little-endian; this exporter needs a little-endian CPU")
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape, dt in entries:
            n = _nbytes(shape, dt)
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

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        self.file.close()
        if kind is None and self.pending:
            raise RuntimeError(f"{self.path}: {len(self.pending)} planned tensors were never written")


def _copy_side_files(base: Path, out: Path, dtype: torch.dtype) -> None:
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


DISK_ADVICE = "free some space, choose another --out, or export in bf16/fp16 instead of fp32"


def _check_disk(out: Path, needed: int) -> None:
    """Fail before writing anything when the export cannot fit on the target disk."""
    check_free(out.parent, needed, "the export", DISK_ADVICE, margin=DISK_MARGIN)



def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="merging", unit="tensor", disable=not enabled, leave=False)


# ---------------------------------------------------------------- verification and report

def verify_export(folder: Path, base: Path, adapter: Path, quant: QuantConfig | None, dtype: torch.dtype,
                  merge_into: str, files: list[Path], pairs, lora: LoraConfig, states: dict | None = None,
                  seq_len: int = 32) -> dict:
    """Load the export with transformers and compare its logits with the adapter on the quantised base.

    The reference is the model the adapter was trained with (quantised in its compute dtype, so it
    sees the same dequantised weights) but run in fp32, so the error measures the export, not bf16
    arithmetic. The other merge base is measured too, by swapping its weights into the loaded export."""
    from transformers import AutoModelForCausalLM

    merged, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
    mismatched = [str(m) for m in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise QLoraKitError(f"the export in {folder} does not load cleanly: missing {first_few(missing)}, "
                            f"unexpected {first_few(unexpected)}, mismatched {first_few(mismatched)}")
    merged.eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    reference = _reference_logits(base, adapter, quant, ids)
    errors = {merge_into: _rel_error(merged, ids, reference)}
    if quant is not None:
        other = "original" if merge_into == "dequantized" else "dequantized"
        _swap_in(merged, files, _Merger(pairs, lora, quant, _quantised_keys(base), other, dtype, states))
        errors[other] = _rel_error(merged, ids, reference)
    return {"missing_keys": missing, "unexpected_keys": unexpected, "batch": list(ids.shape),
            "reference": "adapter on the quantised base, fp32 compute" if quant else "adapter on the base, fp32",
            "logit_rel_error": errors}


def _reference_logits(base: Path, adapter: Path, quant: QuantConfig | None, ids: torch.Tensor) -> torch.Tensor:
    from .adapters import load_adapter
    from .loading import load_model
    from .lora import lora_layers
    from .quant import QuantLinear

    model, _ = load_model(base, quant=quant, dtype=quant.compute_dtype if quant else torch.float32,
                          load_tokenizer=False, progress=False)
    model.float()  # embeddings, norms, biases: their compute-dtype values, now in fp32
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.compute_dtype = torch.float32  # weights still dequantise to the trained values
    load_adapter(model, adapter)
    for layer in lora_layers(model).values():
        layer.dtype = torch.float32
    with torch.no_grad():
        return model(ids).logits.float()


def _rel_error(model, ids: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.float()
    return float(torch.linalg.vector_norm(logits - reference) / torch.linalg.vector_norm(reference))


def _swap_in(model, files: list[Path], merger: _Merger) -> None:
    """Overwrite the loaded export's weights with another merge base's, one tensor at a time."""
    params = model.state_dict()
    with torch.no_grad():
        for key, tensor in iter_safetensors(files):
            if key in params:
                params[key].copy_(merger.merged(key, tensor).float())


def format_report(report: dict) -> str:
    """report.txt: what was merged into what, how well it matches, where the time went."""
    lines = [
        "qlora_kit merged export",
        f"base:       {report['base']}",
        f"adapter:    {report['adapter']} (r={report['lora']['r']}, alpha={report['lora']['alpha']}, "
        f"rslora={report['lora']['rslora']}, scale={report['lora']['scale']:.4g})",
        f"merge base: {report['merge_into']}" + (f" (asked for {report['requested_merge_into']})"
                                                 if report["merge_into"] != report["requested_merge_into"] else ""),
        f"quant:      {report['quant']} [{report['quant_source']}]",
        f"written:    {report['tensors']} tensors, {report['adapted_modules']} merged with an adapter, "
        f"{report['shards']} shard(s), {human_bytes(report['out_bytes'])} in {report['dtype']} "
        f"(base {human_bytes(report['base_bytes'])})",
    ]
    v = report.get("verify")
    if v is None:
        lines.append("verify:     skipped")
    else:
        lines.append(f"verify:     loads with no missing/unexpected keys; logits vs {v['reference']} on a "
                     f"{v['batch']} batch, relative error (Frobenius):")
        for base, err in v["logit_rel_error"].items():
            mark = "  <- exported" if base == report["merge_into"] else ""
            lines.append(f"              {base:12s} {err:.3e}{mark}")
    times = report.get("times_s", {})
    lines.append(f"time:       merge {times.get('merge', 0):.1f} s, verify {times.get('verify', 0):.1f} s")
    norms = report["delta_norms"]
    if norms:
        rel = sorted(norms.items(), key=lambda kv: -kv[1]["relative"])
        lines.append("largest adapter deltas (|scale*B@A| / |W|, Frobenius):")
        lines += [f"  {name}: {n['relative']:.3e}" for name, n in rel[:10]]
    return "\n".join(lines) + "\n"
