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
import shutil
import time
from pathlib import Path

import torch

from ..errors import QLoraKitError, closest
from ..io import atomic_file, disk_full_as_error, tmp_path
from ..models import resolve_model_path
from ..quant import QuantConfig
from . import llamacpp
from .gguf_arch import (GGUFTensor, computed_tensor, gguf_arch, read_config, tensor_layout, to_llama_cpp,
                        transformers_cannot_read, write_hparams)
from .gguf_vocab import read_vocab, write_vocab
from .heldout import DEFAULT_MAX_TOKENS, heldout_report, resolve_eval_file
from .job import prepare_merge, progress_bar
from .merge import MERGE_BASES
from .target import DISK_ADVICE, DISK_MARGIN, check_disk, check_export_target
from .verify import verify_gguf

WRITTEN_TYPES = ("f16", "bf16", "q8_0")  # written here, tensor by tensor
GGUF_TYPES = WRITTEN_TYPES + tuple(llamacpp.QUANT_TYPES)  # the K-quants by llama.cpp's quantiser, from an f16 file


def export_gguf(base: str | Path, adapter: str | Path, out: str | Path, gguf_type: str = "f16",
                merge_into: str = "dequantized", overwrite: bool = False, verify: bool = True,
                quant: QuantConfig | None = None, progress: bool = True,
                compute_dtype: str | torch.dtype | None = None, eval_file: str | Path | bool | None = None,
                eval_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    """Merge `adapter` into the base model folder `base` and write one GGUF file at `out`.

    gguf_type: f16 (llama.cpp's default), bf16, or q8_0 (8-bit blocks of 32, half the size of f16);
        norms, biases and MoE routers stay f32, and a q8_0 matrix whose rows are not a multiple of 32
        is written f16. Or a K-quant (q4_k_m, the file Ollama and LM Studio users download; q5_k_m,
        q6_k, ...): the merged f16 file is written beside `out` and quantised by llama.cpp itself
        (needs the qlora_kit[gguf] extra), then checked in llama.cpp against that f16 file.
    merge_into, quant, compute_dtype: as for `export_merged`.
    verify: load the file with transformers (`gguf_file=`), compare its logits with the adapter on
        the quantised base (fp32), and check its tokenizer encodes a few strings to the same ids as
        the base folder's; for architectures transformers cannot read from GGUF the report says so.
    eval_file: a held-out JSONL (the trainer's format); the report compares perplexity on it of the
        adapter on its quantised base, the merged model and the file in llama.cpp (at most
        `eval_tokens` tokens). None: the eval file of the run the adapter comes from, if it names one;
        False: none.
    Architectures: see gguf_arch.ARCHITECTURES (Llama, Mistral, Mixtral, Qwen2/3 and their MoEs, Gemma
    1-3, Phi-3, OLMo 2, Granite); tokenizers: byte-level BPE (tokenizer.json) or SentencePiece
    (tokenizer.model). Writes atomically and returns a report (also `format_gguf_report`).
    """
    import gguf
    import numpy as np

    started = time.perf_counter()
    gguf_type = str(gguf_type).lower()  # llama.cpp's tools spell them Q4_K_M
    if gguf_type not in GGUF_TYPES:
        raise QLoraKitError(f"unknown GGUF type {gguf_type!r}{closest(str(gguf_type), GGUF_TYPES)}: "
                            f"use one of {', '.join(GGUF_TYPES)}")
    eval_file = resolve_eval_file(eval_file, adapter)
    if gguf_type in llamacpp.QUANT_TYPES:
        return _export_quantised(base, adapter, out, gguf_type, overwrite, verify, eval_file, eval_tokens,
                                 merge_into=merge_into, quant=quant, progress=progress, compute_dtype=compute_dtype)
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
        report["heldout"] = heldout_report(job, eval_file, eval_tokens, tmp)
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


def _export_quantised(base: str | Path, adapter: str | Path, out: str | Path, gguf_type: str, overwrite: bool,
                      verify: bool, eval_file: Path | None, eval_tokens: int, **merge) -> dict:
    """A K-quant: the merged f16 file in a temporary folder beside `out`, quantised by llama.cpp into
    `out` (atomically); the f16 file is removed whether that worked or not.

    f16 rather than bf16 as the source: llama.cpp quantises from either, and f16 keeps 3 more bits of
    each merged weight; the f16 file's own check (verify) would see an overflow."""
    llamacpp.require(f"--gguf-type {gguf_type}")  # before minutes of merging, not after
    out = Path(out)
    if out.suffix != ".gguf":
        raise QLoraKitError(f"{out}: a GGUF export is one file; give a name ending in .gguf")
    check_export_target(out, base, adapter, overwrite, ours=is_gguf_export,
                        what="a GGUF file qlora_kit wrote (it carries a qlora_kit.export key)")
    scratch = tmp_path(out)  # a folder under a temporary name: the next export sweeps it if this one is killed
    source = scratch / out.name
    with atomic_file(out) as tmp:
        try:
            scratch.mkdir()
            report = export_gguf(base, adapter, source, gguf_type="f16", verify=verify, eval_file=False, **merge)
            started = time.perf_counter()
            llamacpp.quantize(source, tmp, gguf_type)
            quantised_s = time.perf_counter() - started
            if verify:
                report["verify"]["llama_cpp"] = llamacpp.compare(tmp, source)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        job = prepare_merge(base, adapter, merge["merge_into"], merge["quant"], merge["compute_dtype"])
        report["heldout"] = heldout_report(job, eval_file, eval_tokens, tmp)
        report |= {"out": str(out), "gguf_type": gguf_type, "quantised_from": {"type": "f16",
                   "bytes": report["out_bytes"]}, "out_bytes": tmp.stat().st_size, "f16_fallbacks": [],
                   "k_fallbacks": llamacpp.fallbacks(tmp)}
    report["times_s"] |= {"quantise": round(quantised_s, 3),
                          "total": round(report["times_s"]["total"] + time.perf_counter() - started, 3)}
    return report


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
