"""Reading an export back and measuring it against the model the adapter was trained with.

The reference is that model (the base quantised in its compute dtype, so it sees the same
dequantised weights, with the adapter loaded) run in fp32, so the error measures the export, not
bf16 arithmetic. Errors are relative Frobenius norms of the logits on a fixed random batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters import load_adapter
from ..errors import QLoraKitError, first_few
from ..loading import load_model
from ..lora import ChangedBase, LoraConfig, expert_loras, lora_layers
from ..quant import QuantConfig, QuantLinear
from ..tensorfiles import iter_safetensors
from .job import MergeJob, quantised_keys
from .merge import ExpertMerge, Merger

TOKENIZER_CHECKS = ["Hello, world! How are you today?", "  two spaces, tabs\tand\nnew lines",
                    "Zahlen 12345 und Umlaute: äöü ß, emoji 🙂", "<|im_start|>user\nhi<|im_end|>\n"]


def verify_export(folder: Path, base: Path, adapter: Path, quant: QuantConfig | None, dtype: torch.dtype,
                  merge_into: str, files: list[Path], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  lora: LoraConfig, states: dict[str, ChangedBase] | None = None, seq_len: int = 32,
                  experts: ExpertMerge | None = None) -> dict:
    """Load the export with transformers and compare its logits with the adapter on the quantised base.

    The other merge base is measured too, by swapping its weights into the loaded export."""
    from transformers import AutoModelForCausalLM

    merged, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
    mismatched = [str(m) for m in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise QLoraKitError(f"the export in {folder} does not load cleanly: missing {first_few(missing)}, "
                            f"unexpected {first_few(unexpected)}, mismatched {first_few(mismatched)}")
    merged.eval()
    ids = _batch(merged.config.vocab_size, seq_len)
    reference = _reference_logits(base, adapter, quant, ids)
    errors = {merge_into: _rel_error(merged, ids, reference)}
    if quant is not None:
        other = "original" if merge_into == "dequantized" else "dequantized"
        _swap_in(merged, files, Merger(pairs, lora, quant, quantised_keys(base), other, dtype, states, experts))
        errors[other] = _rel_error(merged, ids, reference)
    return {"missing_keys": missing, "unexpected_keys": unexpected, "batch": list(ids.shape),
            "reference": _reference_name(quant), "logit_rel_error": errors}


def verify_gguf(path: Path, job: MergeJob, byte_level: bool = True, seq_len: int = 32) -> dict:
    """Read the file back with transformers: logits against the adapter on the quantised base (fp32,
    the reference the safetensors export is checked against), and tokenizer ids against the base's.
    When transformers cannot read the file, {"skipped": why} instead of failing the export.
    byte_level: the file carries a byte-level BPE vocabulary. A SentencePiece one is not re-tokenized:
    transformers rebuilds it per architecture (as BPE for Qwen2) and not always as sentencepiece
    splits, so a mismatch would blame a correct file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    except (RuntimeError, ValueError, NotImplementedError, KeyError) as e:
        # transformers' GGUF reader knows fewer configs than llama.cpp (e.g. a head_dim that is not
        # hidden/heads for Qwen3): the file is still llama.cpp's to run, only this check cannot be made
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return {"skipped": f"transformers could not read the file back ({type(e).__name__}: {reason}); "
                           "the file was not verified by transformers: check it in llama.cpp"}
    differences = _config_differences(model.config, job.base)
    if differences:
        return {"skipped": f"transformers reads this GGUF with another config ({first_few(differences, 3)}): its GGUF "
                           "reader does not carry every field llama.cpp uses; the file was not verified by "
                           "transformers: check it in llama.cpp"}
    ids = _batch(model.config.vocab_size, seq_len)
    error = _rel_error(model, ids, _reference_logits(job.base, job.adapter, job.quant, ids))
    del model

    checked = {"batch": list(ids.shape), "logit_rel_error": error, "tokenizer_strings": 0,
               "reference": _reference_name(job.quant)}
    if not byte_level:
        return checked
    ours, theirs = AutoTokenizer.from_pretrained(folder, gguf_file=name), AutoTokenizer.from_pretrained(str(job.base))
    mismatched = [text for text in TOKENIZER_CHECKS if ours(text)["input_ids"] != theirs(text)["input_ids"]]
    if mismatched:
        raise QLoraKitError(f"the GGUF tokenizer encodes {first_few(repr(t) for t in mismatched)} differently from "
                            f"{job.base}'s tokenizer; the file was not written")
    return checked | {"tokenizer_strings": len(TOKENIZER_CHECKS)}


def _config_differences(read, base: Path) -> list[str]:
    """Numeric config fields the GGUF-loaded model has otherwise than the base (token ids aside):
    those transformers' GGUF reader filled with its defaults. A comparison with such a model would
    measure the reader, not the file."""
    import math

    from transformers import AutoConfig

    theirs, ours = AutoConfig.from_pretrained(str(base)).to_dict(), read.to_dict()
    out = []
    for key, want in theirs.items():
        got = ours.get(key)
        if key.endswith("_token_id") or not isinstance(want, (int, float)) or not isinstance(got, (int, float)):
            continue
        if not math.isclose(float(got), float(want), rel_tol=1e-6):
            out.append(f"{key}={got} where the model has {want}")
    return out


def _batch(vocab_size: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))


def _reference_name(quant: QuantConfig | None) -> str:
    return "adapter on the quantised base, fp32 compute" if quant else "adapter on the base, fp32"


def _reference_logits(base: Path, adapter: Path, quant: QuantConfig | None, ids: torch.Tensor) -> torch.Tensor:
    model = reference_model(base, adapter, quant)
    with torch.no_grad():
        return model(ids).logits.float()


def reference_model(base: Path, adapter: Path, quant: QuantConfig | None):
    """The adapter on the base quantised as in training, computing in fp32: the model the user trained."""
    model, _ = load_model(base, quant=quant, dtype=quant.compute_dtype if quant else torch.float32,
                          load_tokenizer=False, progress=False)
    model.float()  # embeddings, norms, biases: their compute-dtype values, now in fp32
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.compute_dtype = torch.float32  # weights still dequantise to the trained values
    load_adapter(model, adapter)
    for layer in [*lora_layers(model).values(), *expert_loras(model).values()]:
        layer.dtype = torch.float32
    return model.eval()


def _rel_error(model, ids: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.float()
    return float(torch.linalg.vector_norm(logits - reference) / torch.linalg.vector_norm(reference))


def merged_model(job: MergeJob):
    """The merged model in fp32 (the merge as every writer computes it, before it is stored)."""
    model, _ = load_model(job.base, quant=None, dtype=torch.float32, load_tokenizer=False, progress=False)
    params = model.state_dict()
    with torch.no_grad():
        for key, tensor in job.merged_tensors(torch.float32):
            if key in params:
                params[key].copy_(tensor)
    return model.eval()


def _swap_in(model, files: list[Path], merger: Merger) -> None:
    """Overwrite the loaded export's weights with another merge base's, one tensor at a time."""
    params = model.state_dict()
    with torch.no_grad():
        for key, tensor in iter_safetensors(files):
            name, piece = merger.locate(key)
            if piece is not None:  # one expert of a fused parameter (computed again for each of its pieces)
                params[piece.param][piece.expert].copy_(merger.fused_expert(piece, key, tensor).to(merger.dtype))
            elif name in params:
                params[name].copy_(merger.merged(key, tensor).float())
