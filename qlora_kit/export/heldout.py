"""Held-out perplexity of what the user trained and of what they will ship, side by side.

    eval JSONL (the trainer's record format)  ->  token ids and labels, as the trainer scores them
    perplexity = exp(mean negative log-likelihood of the labelled tokens) for
        adapter     the adapter on the base quantised as in training (fp32 compute): what was trained
        merged      the merged weights in fp32: what every writer stores
        gguf        the written GGUF file run in llama.cpp (when llama-cpp-python is installed)

The same ids go into every model (llama.cpp gets ids, not text), so the numbers differ only by the
weights: the merge (adapter -> merged, expected equal) and the file's storage (merged -> gguf: f16
rounding, or a K-quant's loss). Cheap by design: at most `max_tokens` tokens are evaluated (the first
examples of the file; the report says how many), one sequence at a time on the CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import prepare_tokenizer, read_jsonl, tokenize
from ..losses import IGNORE_INDEX
from ..runs import RUN_FILE
from . import llamacpp
from .job import MergeJob
from .verify import merged_model, reference_model

DEFAULT_MAX_TOKENS = 4096


@dataclass
class HeldOut:
    """The evaluated examples: (ids, labels) pairs, and how much of the file they cover."""

    path: Path
    examples: list[tuple[list[int], list[int]]]
    records: int  # examples in the file
    tokens: int   # tokens run through each model
    targets: int  # tokens scored
    max_tokens: int

    def summary(self) -> dict:
        return {"file": str(self.path), "examples": len(self.examples), "of_records": self.records,
                "tokens": self.tokens, "scored_tokens": self.targets, "max_tokens": self.max_tokens}


def run_eval_file(adapter: str | Path) -> Path | None:
    """The held-out file named by the SFT run the adapter belongs to (OUT/adapter or a checkpoint's), if any."""
    adapter = Path(adapter).resolve()
    for folder in list(adapter.parents)[:3]:
        try:
            config = json.loads((folder / RUN_FILE).read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        name = (config.get("data") or {}).get("eval")
        if not name or (config.get("train") or {}).get("method", "sft") != "sft":
            return None  # none named, or preference pairs (DPO, ORPO), which have no single reply to score
        for candidate in (Path(name), folder / name, folder.parent / name):
            if candidate.is_file():
                return candidate
        return None
    return None


def load_heldout(path: str | Path, base: Path, max_tokens: int = DEFAULT_MAX_TOKENS) -> HeldOut:
    """Tokenise the eval file as the trainer does, keeping whole examples until `max_tokens` is spent
    (the last one cut to fit); examples with nothing to score are left out."""
    from transformers import AutoTokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(base)))
    records = read_jsonl(path)
    examples, tokens = [], 0
    for record in records:
        ids, labels = tokenize(record, tokenizer)
        ids, labels = ids[:max_tokens - tokens], labels[:max_tokens - tokens]
        if len(ids) < 2 or all(label == IGNORE_INDEX for label in labels[1:]):
            continue
        examples.append((ids, labels))
        tokens += len(ids)
        if tokens >= max_tokens:
            break
    targets = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for _, labels in examples)
    return HeldOut(Path(path), examples, len(records), tokens, targets, max_tokens)


def perplexities(job: MergeJob, heldout: HeldOut, gguf: Path | None = None) -> dict:
    """{"adapter", "merged", "gguf"} perplexities on the held-out examples, one model in memory at a time."""
    result = {"data": heldout.summary()}
    for name, build in (("adapter", lambda: reference_model(job.base, job.adapter, job.quant)),
                        ("merged", lambda: merged_model(job))):
        model = build()
        result[name] = _perplexity(lambda ids: _torch_logits(model, ids), heldout.examples)
        del model
    result["gguf"] = None
    if gguf is not None:
        if llamacpp.available():
            longest = max(len(ids) for ids, _ in heldout.examples)
            with llamacpp.LlamaCpp(gguf, n_ctx=max(64, longest)) as model:
                result["gguf"] = _perplexity(lambda ids: torch.from_numpy(model.logits(ids)), heldout.examples)
        else:
            result["gguf_skipped"] = f"llama.cpp is not installed ({llamacpp.INSTALL_HINT})"
    return result


def resolve_eval_file(eval_file: str | Path | bool | None, adapter: str | Path) -> Path | None:
    """The file an export evaluates: `eval_file`, or the run's when it is None, or none (False); read
    once here, so that a missing or malformed file fails before minutes of merging, not after."""
    if eval_file is None:
        eval_file = run_eval_file(adapter)
    if not eval_file:
        return None
    read_jsonl(eval_file)
    return Path(eval_file)


def heldout_report(job: MergeJob, eval_file: Path | None, max_tokens: int, gguf: Path | None = None) -> dict | None:
    """The perplexities for an export's report, or None without an eval file."""
    if eval_file is None:
        return None
    return perplexities(job, load_heldout(eval_file, job.base, max_tokens), gguf)


def _torch_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _perplexity(logits_of, examples: list[tuple[list[int], list[int]]]) -> float:
    """exp of the mean negative log-likelihood of every labelled token after the first."""
    total, count = 0.0, 0
    for ids, labels in examples:
        logp = torch.log_softmax(logits_of(ids)[:-1].double(), dim=-1)
        targets = torch.tensor(labels[1:])
        keep = targets != IGNORE_INDEX
        total -= float(logp[keep].gather(1, targets[keep][:, None]).sum())
        count += int(keep.sum())
    return math.exp(total / count)
