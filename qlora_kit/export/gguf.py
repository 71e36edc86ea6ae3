"""Merged export to one GGUF file, the format llama.cpp, Ollama and LM Studio read.

    config.json, tokenizer, base headers  ->  metadata, tensor infos (llama.cpp's names, shapes, types)
    for each base tensor, in file order (the same merge as the safetensors export):
        W = merge base + scale * B @ A   (fp32)
        in llama.cpp's layout (gguf_arch: rope pairs, Gemma norms, experts stacked per layer),
        stored as f16 / bf16 / q8_0 and appended to the file

Why streaming works with the `gguf` package's GGUFWriter: `add_tensor` keeps every array until the
file is written, but the writer also takes tensor infos alone (`add_tensor_info`) and then the data
one tensor at a time (`write_tensor_data`), in the order the infos were given. Every shape and type
is known from the safetensors headers, so memory holds one tensor (for an MoE, one layer's experts
while they are stacked), never the model.

Architectures: gguf_arch.py; tokenizers: gguf_vocab.py.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from ..errors import QLoraKitError, closest
from ..io import atomic_file, disk_full_as_error
from ..models import resolve_model_path
from ..quant import QuantConfig
from .gguf_arch import (GGUFTensor, computed_tensor, gguf_arch, read_config, tensor_layout, to_llama_cpp,
                        transformers_cannot_read, write_hparams)
from .gguf_vocab import read_vocab, write_vocab
from .job import prepare_merge, progress_bar
from .merge import MERGE_BASES
from .target import DISK_ADVICE, DISK_MARGIN, check_disk, check_export_target
from .verify import verify_gguf

GGUF_TYPES = ("f16", "bf16", "q8_0")


def export_gguf(base: str | Path, adapter: str | Path, out: str | Path, gguf_type: str = "f16",
                merge_into: str = "dequantized", overwrite: bool = False, verify: bool = True,
                quant: QuantConfig | None = None, progress: bool = True,
                compute_dtype: str | torch.dtype | None = None) -> dict:
    """Merge `adapter` into the base model folder `base` and write one GGUF file at `out`.

    gguf_type: f16 (llama.cpp's default), bf16, or q8_0 (8-bit blocks of 32, half the size of f16);
        norms, biases and MoE routers stay f32, and a q8_0 matrix whose rows are not a multiple of 32
        is written f16.
    merge_into, quant, compute_dtype: as for `export_merged`.
    verify: load the file with transformers (`gguf_file=`), compare its logits with the adapter on
        the quantised base (fp32), and check its tokenizer encodes a few strings to the same ids as
        the base folder's; for architectures transformers cannot read from GGUF the report says so.
    Architectures: see gguf_arch.ARCHITECTURES (Llama, Mistral, Mixtral, Qwen2/3 and their MoEs, Gemma
    1-3, Phi-3, OLMo 2, Granite); tokenizers: byte-level BPE (tokenizer.json) or SentencePiece
    (tokenizer.model). Writes atomically and returns a report (also `format_gguf_report`).
    """
    import gguf
    import numpy as np

    started = time.perf_counter()
    if gguf_type not in GGUF_TYPES:
        raise QLoraKitError(f"unknown GGUF type {gguf_type!r}{closest(str(gguf_type), GGUF_TYPES)}: "
                            f"use one of {', '.join(GGUF_TYPES)}")
    if merge_into not in MERGE_BASES:
        raise QLoraKitError(f"merge_into={merge_into!r}: use 'dequantized' or 'original'")
    out = Path(out)
    if out.suffix != ".gguf":
        raise QLoraKitError(f"{out}: a GGUF export is one file; give a name ending in .gguf")
    check_export_target(out, base, adapter, overwrite, ours=is_gguf_export,
                        what="a GGUF file qlora_kit wrote (it carries a qlora_kit.export key)")
    config = read_config(resolve_model_path(base))
    vocab = read_vocab(resolve_model_path(base), config["vocab_size"])
    job = prepare_merge(base, adapter, merge_into, quant, compute_dtype)
    arch = gguf.MODEL_ARCH_NAMES[gguf_arch(config)]
    layout = tensor_layout(job.plan, config, gguf_type)
    out_bytes = sum(t.nbytes for t in layout)
    check_disk(out, out_bytes)

    writer_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    marker = json.dumps({"adapter": str(job.adapter), "merge_into": job.merge_into, "gguf_type": gguf_type})
    with disk_full_as_error(out.parent, out_bytes + DISK_MARGIN, "the GGUF export", DISK_ADVICE), \
            atomic_file(out) as tmp:
        with _closing(gguf.GGUFWriter(tmp, arch)) as writer:
            writer.add_name(out.stem)
            writer.add_type("model")
            writer.add_file_type(int(writer_types[gguf_type]))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            write_hparams(writer, config)
            write_vocab(writer, vocab)
            writer.add_string(MARKER_KEY, marker)
            for t in layout:
                # the type is given raw; the numpy dtype only has to not be uint8 (which means "shape in bytes")
                writer.add_tensor_info(t.name, t.shape, np.float32, t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with progress_bar(len(layout), progress) as bar:
                for t, tensor in _file_tensors(layout, job, config):
                    writer.write_tensor_data(_encode(to_llama_cpp(t, tensor, config), t.qtype))
                    bar.update(1)
        written_s = time.perf_counter() - started
        report = {"base": str(job.base), "adapter": str(job.adapter), "out": str(out), "format": "gguf",
                  "gguf_type": gguf_type, "architecture": arch, "model_type": config["model_type"], **job.summary(),
                  "tensors": len(layout), "out_bytes": tmp.stat().st_size,
                  "base_bytes": sum(f.stat().st_size for f in job.files),
                  "f16_fallbacks": sorted(t.name for t in layout
                                          if gguf_type == "q8_0" and t.qtype == gguf.GGMLQuantizationType.F16),
                  "tokenizer": {"model": vocab.model, "pre": vocab.pre, "tokens": len(vocab.tokens)},
                  "verify": None}
        if verify:
            unread = transformers_cannot_read(config)
            report["verify"] = ({"skipped": f"{unread}; the file was not verified by transformers: check it in "
                                            "llama.cpp"} if unread else
                                verify_gguf(tmp, job, byte_level=vocab.model == "gpt2"))
    report["times_s"] = {"write": round(written_s, 3), "verify": round(time.perf_counter() - started - written_s, 3),
                         "total": round(time.perf_counter() - started, 3)}
    return report


def _file_tensors(layout: list[GGUFTensor], job, config: dict):
    """(tensor, merged fp32 data) in the layout's order: computed tensors first, then the merged base
    tensors as they stream by; a stacked expert tensor is held until its last expert arrives."""
    by_key = {key: t for t in layout for key in t.sources}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for t in layout:
        if not t.sources:
            yield t, computed_tensor(t, config)
    for key, tensor in job.merged_tensors(torch.float32):
        t = by_key.get(key)
        if t is None:
            continue
        if len(t.sources) == 1:
            yield t, tensor
            continue
        parts = pending.setdefault(t.name, {})
        parts[key] = tensor
        if len(parts) == len(t.sources):
            del pending[t.name]
            yield t, torch.stack([parts.pop(k) for k in t.sources])


@contextlib.contextmanager
def _closing(writer):
    """Close the writer when done, and after a failure too, where its last flush may fail as well
    (a full disk): the failure that stopped the export is the one raised."""
    try:
        yield writer
    except BaseException:
        try:
            writer.close()
        except OSError:
            pass
        raise
    writer.close()


MARKER_KEY = "qlora_kit.export"  # our own key in the file's metadata (llama.cpp ignores unknown keys)


def is_gguf_export(path: Path) -> bool:
    """A GGUF file `export_gguf` wrote: overwrite replaces only those."""
    from gguf import GGUFReader

    try:
        return path.is_file() and MARKER_KEY in GGUFReader(path).fields
    except Exception:  # not a GGUF file at all: the reader's errors are its own
        return False


# ---------------------------------------------------------------- tensors

def _encode(w: torch.Tensor, qtype):
    """The tensor's bytes as GGUF stores them, as a numpy array the writer appends."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    w = w.detach().float().contiguous()
    if qtype == Q.F32:
        return w.numpy()
    if qtype == Q.F16:
        return w.half().numpy()
    if qtype == Q.BF16:
        return w.bfloat16().view(torch.int16).numpy()
    return quantize(w.numpy(), Q.Q8_0)
