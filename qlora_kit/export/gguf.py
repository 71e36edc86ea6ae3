"""Merged export to one GGUF file, the format llama.cpp, Ollama and LM Studio read.

    headers of the base + adapter  ->  tensor infos (GGUF names, shapes, types) and metadata
    for each base tensor, in file order (the same merge as the safetensors export):
        W = merge base + scale * B @ A   (fp32)
        rename it (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight),
        permute Llama's q/k rows, store as f16 / bf16 / q8_0, append to the file

Why streaming works with the `gguf` package's GGUFWriter: `add_tensor` keeps every array until the
file is written, but the writer also takes tensor infos alone (`add_tensor_info`) and then the data
one tensor at a time (`write_tensor_data`), in the order the infos were given. Every shape and type
is known from the safetensors headers, so memory holds one tensor, never the model.

Why q and k are permuted for Llama and Mistral: llama.cpp rotates adjacent pairs of dimensions
(x0, x1), (x2, x3)... while Hugging Face rotates the two halves of each head (x_i, x_{i+d/2}).
Reordering each head's rows from [first half; second half] to interleaved pairs gives the same
attention; transformers undoes it when it reads a GGUF. Qwen2 in llama.cpp uses the halves layout
(NeoX rope), so its weights go in as they are.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import torch

from ..errors import QLoraKitError, closest, first_few
from ..io import atomic_file, disk_full_as_error, tmp_path
from ..models import resolve_model_path
from ..quant import QuantConfig
from . import llamacpp
from .heldout import DEFAULT_MAX_TOKENS, heldout_report, resolve_eval_file
from .job import prepare_merge, progress_bar
from .merge import MERGE_BASES
from .shards import Entry
from .target import DISK_ADVICE, DISK_MARGIN, check_disk, check_export_target
from .verify import verify_gguf

WRITTEN_TYPES = ("f16", "bf16", "q8_0")  # written here, tensor by tensor
GGUF_TYPES = WRITTEN_TYPES + tuple(llamacpp.QUANT_TYPES)  # the K-quants by llama.cpp's quantiser, from an f16 file
# Hugging Face model_type -> llama.cpp architecture. Mistral is a Llama to llama.cpp.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
Q8_BLOCK, Q8_BYTES = 32, 34  # q8_0: 32 int8 weights and one fp16 scale per block


def export_gguf(base: str | Path, adapter: str | Path, out: str | Path, gguf_type: str = "f16",
                merge_into: str = "dequantized", overwrite: bool = False, verify: bool = True,
                quant: QuantConfig | None = None, progress: bool = True,
                compute_dtype: str | torch.dtype | None = None, eval_file: str | Path | bool | None = None,
                eval_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    """Merge `adapter` into the base model folder `base` and write one GGUF file at `out`.

    gguf_type: f16 (llama.cpp's default), bf16, or q8_0 (8-bit blocks of 32, half the size of f16);
        norms and biases stay f32, and a q8_0 matrix whose rows are not a multiple of 32 is written f16.
        Or a K-quant (q4_k_m, the file Ollama and LM Studio users download; q5_k_m, q6_k, ...): the
        merged f16 file is written beside `out` and quantised by llama.cpp itself (needs the
        qlora_kit[gguf] extra), then checked in llama.cpp against that f16 file.
    merge_into, quant, compute_dtype: as for `export_merged`.
    verify: load the file with transformers (`gguf_file=`), compare its logits with the adapter on
        the quantised base (fp32), and check its tokenizer encodes a few strings to the same ids as
        the base folder's.
    eval_file: a held-out JSONL (the trainer's format); the report compares perplexity on it of the
        adapter on its quantised base, the merged model and the file in llama.cpp (at most
        `eval_tokens` tokens). None: the eval file of the run the adapter comes from, if it names one;
        False: none.
    Supports Llama, Mistral and Qwen2 models (tied embeddings included) with a byte-level BPE
    tokenizer (tokenizer.json). Writes atomically and returns a report (also `format_gguf_report`).
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
    config = _read_config(resolve_model_path(base))
    job = prepare_merge(base, adapter, merge_into, quant, compute_dtype)
    arch = ARCHITECTURES[config["model_type"]]
    tokenizer = _tokenizer_metadata(job.base, config["vocab_size"])
    layout = _layout(job.plan, config, gguf_type)
    out_bytes = sum(nbytes for _, (_, _, nbytes) in layout.values())
    check_disk(out, out_bytes)

    writer_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    marker = json.dumps({"adapter": str(job.adapter), "merge_into": job.merge_into, "gguf_type": gguf_type})
    with disk_full_as_error(out.parent, out_bytes + DISK_MARGIN, "the GGUF export", DISK_ADVICE), \
            atomic_file(out) as tmp:
        with _closing(gguf.GGUFWriter(tmp, arch)) as writer:
            _write_metadata(writer, config, arch, out.stem, int(writer_types[gguf_type]), tokenizer)
            writer.add_string(MARKER_KEY, marker)
            for name, (shape, qtype, nbytes) in layout.values():
                # the type is given raw; the numpy dtype only has to not be uint8 (which means "shape in bytes")
                writer.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with progress_bar(len(layout), progress) as bar:
                for key, tensor in job.merged_tensors(torch.float32):
                    if key not in layout:
                        continue
                    name, (shape, qtype, nbytes) = layout[key]
                    writer.write_tensor_data(_encode(_reorder(name, tensor, config, arch), qtype))
                    bar.update(1)
        written_s = time.perf_counter() - started
        report = {"base": str(job.base), "adapter": str(job.adapter), "out": str(out), "format": "gguf",
                  "gguf_type": gguf_type, "architecture": arch, **job.summary(),
                  "tensors": len(layout), "out_bytes": tmp.stat().st_size,
                  "base_bytes": sum(f.stat().st_size for f in job.files),
                  "f16_fallbacks": sorted(n for n, (_, q, _) in layout.values()
                                          if gguf_type == "q8_0" and q == gguf.GGMLQuantizationType.F16),
                  "tokenizer": {"model": tokenizer["model"], "pre": tokenizer["pre"],
                                "tokens": len(tokenizer["tokens"])},
                  "verify": None}
        if verify:
            report["verify"] = verify_gguf(tmp, job)
        report["heldout"] = heldout_report(job, eval_file, eval_tokens, tmp)
    report["times_s"] = {"write": round(written_s, 3), "verify": round(time.perf_counter() - started - written_s, 3),
                         "total": round(time.perf_counter() - started, 3)}
    return report


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


# ---------------------------------------------------------------- what llama.cpp needs to know

def _read_config(base: Path) -> dict:
    """config.json, checked to describe a model this writer can express in llama.cpp's terms."""
    if not (base / "config.json").is_file():
        raise QLoraKitError(f"{str(base)!r} is not a model folder: it has no config.json")
    config = json.loads((base / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise QLoraKitError(f"cannot write {model_type!r} models to GGUF: the GGUF export supports "
                            f"{', '.join(ARCHITECTURES)} (Llama family, e.g. SmolLM2); export to safetensors "
                            "(--format safetensors) and convert with llama.cpp's convert_hf_to_gguf.py")
    if config.get("hidden_act", "silu") != "silu":
        raise QLoraKitError(f"{base}: hidden_act {config['hidden_act']!r}; llama.cpp's {model_type} expects silu")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise QLoraKitError(f"{base}: rope scaling {rope_type!r} is not written by the GGUF export (default and "
                            "linear are); export to safetensors and convert with llama.cpp's convert_hf_to_gguf.py")
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config["rope"] = rope | {"rope_type": rope_type,
                             "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0))}
    return config


def _write_metadata(writer, config: dict, arch: str, name: str, file_type: int, tok: dict) -> None:
    from gguf import TokenType

    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(float(config["rope"]["rope_theta"]))
    if config["rope"]["rope_type"] == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config["rope"]["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])

    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types([int(TokenType[t]) for t in tok["types"]])
    writer.add_token_merges(tok["merges"])
    for key, token_id in tok["ids"].items():
        if token_id is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}", token_id)
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def _tokenizer_metadata(base: Path, vocab_size: int) -> dict:
    """The base's tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary: tokens by id, their
    types, merges, special ids, whether BOS/EOS are added, and the chat template."""
    from transformers import AutoTokenizer

    if not (base / "tokenizer.json").is_file():
        raise QLoraKitError(f"{base} has no tokenizer.json: the GGUF export carries byte-level BPE tokenizers "
                            "(Llama 3, Qwen2, SmolLM2, GPT-2 style) from tokenizer.json; for a sentencepiece "
                            "tokenizer use llama.cpp's convert_hf_to_gguf.py on a safetensors export")
    tok = AutoTokenizer.from_pretrained(str(base))
    spec = json.loads(tok.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    if model.get("type") != "BPE" or not _has_byte_level(pre):
        raise QLoraKitError(f"{base}: tokenizer is {model.get('type')} without a byte-level pre-tokenizer; the GGUF "
                            "export carries byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, GPT-2 style) only; "
                            "use llama.cpp's convert_hf_to_gguf.py on a safetensors export")
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise QLoraKitError(f"{base}: the tokenizer has {len(vocab)} tokens but the model embeds only {vocab_size}")
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], ["UNUSED"] * vocab_size
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = ("CONTROL" if added[text].special else "USER_DEFINED") if text in added else "NORMAL"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    with_specials = tok("a")["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    return {
        "model": "gpt2", "pre": _pre_tokenizer_name(pre), "tokens": tokens, "types": types, "merges": merges,
        "ids": {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                "unknown_token_id": tok.unk_token_id, "padding_token_id": tok.pad_token_id},
        "add_bos": tok.bos_token_id is not None and with_specials[:1] == [tok.bos_token_id] != plain[:1],
        "add_eos": tok.eos_token_id is not None and with_specials[-1:] == [tok.eos_token_id] != plain[-1:],
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
    }


def _has_byte_level(pre) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre.get("pretrainers", pre.get("pretokenizers", [])))


def _pre_tokenizer_name(pre: dict) -> str:
    """llama.cpp's name for the way text is split before BPE, read from the tokenizer's structure.

    GPT-2's own split (ByteLevel with its regex) is "gpt-2"; a Split regex in front of a regex-free
    ByteLevel is matched against the splits llama.cpp knows by name (Llama 3, Qwen2); digits split
    one by one in front of ByteLevel is SmolLM's and StarCoder's "smollm"."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if GGUF_PRE_TOKENIZER_SPLITS[name] == regex:
                return name
    raise QLoraKitError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is not one the GGUF export can "
                        "name for llama.cpp (GPT-2, SmolLM, Llama 3, Qwen2 splits); use llama.cpp's "
                        "convert_hf_to_gguf.py on a safetensors export")


# ---------------------------------------------------------------- tensors

def _layout(plan: list[Entry], config: dict, gguf_type: str) -> dict[str, tuple[str, tuple[tuple[int, ...], object, int]]]:
    """{base key: (GGUF name, (shape, GGML type, bytes))} in file order; tied lm_head and rotary buffers dropped."""
    from gguf import GGMLQuantizationType as Q

    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]
    layout, unknown = {}, []
    for key, shape, dtype in plan:
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.get("tie_word_embeddings")):
            continue
        name = gguf_name(key)
        if name is None or not dtype.is_floating_point:
            unknown.append(key)
            continue
        qtype = Q.F32 if len(shape) == 1 else wanted
        if qtype == Q.Q8_0 and shape[-1] % Q8_BLOCK:
            qtype = Q.F16  # llama.cpp's converter does the same for rows that do not fill whole blocks
        layout[key] = (name, (shape, qtype, _nbytes(shape, qtype)))
    if unknown:
        raise QLoraKitError(f"the base holds tensors the GGUF export cannot name for llama.cpp: {first_few(unknown)}")
    return layout


def gguf_name(key: str) -> str | None:
    """llama.cpp's tensor name for a Hugging Face Llama-family key, or None when it has none."""
    if key in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[key]
    parts = key.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    module, suffix = ".".join(parts[3:-1]), parts[-1]
    if module not in _LAYER_NAMES or suffix not in ("weight", "bias"):
        return None
    return f"blk.{parts[2]}.{_LAYER_NAMES[module]}.{suffix}"


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGMLQuantizationType as Q

    n = 1
    for d in shape:
        n *= d
    return n // Q8_BLOCK * Q8_BYTES if qtype == Q.Q8_0 else n * (4 if qtype == Q.F32 else 2)


def _reorder(name: str, w: torch.Tensor, config: dict, arch: str) -> torch.Tensor:
    """Llama's q/k rows (and biases) from Hugging Face's rotate-half layout to llama.cpp's pairs."""
    if arch != "llama" or not (".attn_q." in name or ".attn_k." in name):
        return w
    heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


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
