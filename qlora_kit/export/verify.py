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
from ..lora import ChangedBase, LoraConfig, lora_layers
from ..quant import QuantConfig, QuantLinear
from ..tensorfiles import iter_safetensors
from .job import MergeJob, quantised_keys
from .merge import Merger

TOKENIZER_CHECKS = ["Hello, world! How are you today?", "  two spaces, tabs\tand\nnew lines",
                    "Zahlen 12345 und Umlaute: äöü ß, emoji 🙂", "<|im_start|>user\nhi<|im_end|>\n"]


def verify_export(folder: Path, base: Path, adapter: Path, quant: QuantConfig | None, dtype: torch.dtype,
                  merge_into: str, files: list[Path], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  lora: LoraConfig, states: dict[str, ChangedBase] | None = None, seq_len: int = 32) -> dict:
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
        _swap_in(merged, files, Merger(pairs, lora, quant, quantised_keys(base), other, dtype, states))
        errors[other] = _rel_error(merged, ids, reference)
    return {"missing_keys": missing, "unexpected_keys": unexpected, "batch": list(ids.shape),
            "reference": _reference_name(quant), "logit_rel_error": errors}


def verify_gguf(path: Path, job: MergeJob, seq_len: int = 32) -> dict:
    """Read the file back with transformers: logits against the adapter on the quantised base (fp32,
    the reference the safetensors export is checked against), and tokenizer ids against the base's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = _batch(model.config.vocab_size, seq_len)
    error = _rel_error(model, ids, _reference_logits(job.base, job.adapter, job.quant, ids))
    del model

    ours, theirs = AutoTokenizer.from_pretrained(folder, gguf_file=name), AutoTokenizer.from_pretrained(str(job.base))
    mismatched = [text for text in TOKENIZER_CHECKS if ours(text)["input_ids"] != theirs(text)["input_ids"]]
    if mismatched:
        raise QLoraKitError(f"the GGUF tokenizer encodes {first_few(repr(t) for t in mismatched)} differently from "
                            f"{job.base}'s tokenizer; the file was not written")
    return {"batch": list(ids.shape), "logit_rel_error": error, "tokenizer_strings": len(TOKENIZER_CHECKS),
            "reference": _reference_name(job.quant)}


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
    for layer in lora_layers(model).values():
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
            if key in params:
                params[key].copy_(merger.merged(key, tensor).float())
