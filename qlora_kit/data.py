"""Training data: JSONL in three shapes, tokenised with loss masks.

    {"text": "..."}                                         plain language modelling, every token trained
    {"instruction": "...", "input": "...", "output": "..."} Alpaca: rendered as a user/assistant chat
    {"messages": [{"role": "user", "content": "..."}, ...]} chat: only assistant turns are trained

Chats are rendered with the tokenizer's chat template; a tokenizer without one gets FALLBACK_TEMPLATE
(ChatML). Labels are -100 on prompt tokens and padding. Every example ends in EOS (the template's
end-of-turn token, or the tokenizer's eos appended to plain text), and the pad token is never EOS:
with pad == EOS, masking padding would also mask the EOS the model must learn to stop on.

A batch is the examples it draws, whether padded one a row or packed several a row (`collate`):
packing keeps each example's positions and attention its own, so it changes the speed, not the loss.
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import QLoraKitError, closest
from .losses import IGNORE_INDEX

# What chat templates render; only assistant turns are trained. Any other role is a typo or a format
# the template would render as something the model never saw.
CHAT_ROLES = ("system", "user", "assistant", "tool")
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class DataStats:
    lines: int = 0
    skipped: list[str] = field(default_factory=list)   # "file:line: reason"
    truncated: int = 0
    dropped_all_masked: int = 0
    examples: int = 0
    tokens: int = 0

    def summary(self) -> str:
        s = f"{self.examples} examples, {self.tokens} tokens"
        if self.truncated:
            s += f", {self.truncated} truncated"
        if self.dropped_all_masked:
            s += f", {self.dropped_all_masked} dropped (nothing left to train on after truncation)"
        if self.skipped:
            s += f", {len(self.skipped)} bad lines skipped (first: {self.skipped[0]})"
        return s


def read_jsonl(path: str | Path, on_bad_line: str = "error", stats: DataStats | None = None,
               check: Callable[[dict], object] | None = None) -> list[dict]:
    """Records of a JSONL file; a malformed line is an error naming file and line (or skipped).

    `check` raises QLoraKitError for a record of the wrong shape (default: an SFT example). A line
    that is not UTF-8 text is a malformed line like any other."""
    check = check or example_kind
    path = Path(path)
    stats = stats if stats is not None else DataStats()
    if not path.is_file():
        raise QLoraKitError(f"data file {path} does not exist")
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line, reason = None, (f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                      "save the file as UTF-8")
            if line is not None and not line.strip():
                continue
            stats.lines += 1
            try:
                if line is None:
                    raise QLoraKitError(reason)
                record = json.loads(line)
                check(record)
            except (json.JSONDecodeError, QLoraKitError) as e:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                if on_bad_line == "skip":
                    stats.skipped.append(f"{path}:{number}: {reason}")
                    continue
                raise QLoraKitError(f"{path}, line {number}: {reason} (set data.on_bad_line: skip "
                                    "to skip bad lines)") from None
            records.append(record)
    if not records:
        raise QLoraKitError(f"data file {path} has no examples" +
                            (f" ({len(stats.skipped)} bad lines skipped)" if stats.skipped else ""))
    return records


def example_kind(record) -> str:
    if not isinstance(record, dict):
        raise QLoraKitError("each line must be a JSON object")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise QLoraKitError("'messages' must be a non-empty list of {\"role\", \"content\"} strings")
        unknown = [(i, m["role"]) for i, m in enumerate(msgs, 1) if m["role"] not in CHAT_ROLES]
        if unknown:
            i, role = unknown[0]
            raise QLoraKitError(f"message {i} has role {role!r}{closest(role, CHAT_ROLES)}; chat roles are "
                                f"{', '.join(CHAT_ROLES)}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise QLoraKitError("a chat example needs at least one assistant message to train on")
        return "chat"
    if "instruction" in record and "output" in record:
        if not all(isinstance(record.get(k, ""), str) for k in ("instruction", "input", "output")):
            raise QLoraKitError("Alpaca fields instruction/input/output must be strings")
        return "alpaca"
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise QLoraKitError("'text' must be a non-empty string")
        return "text"
    raise QLoraKitError(f"unrecognised example with keys {sorted(record)}: expected 'text', "
                        "'instruction'+'output' (Alpaca) or 'messages' (chat)")


def to_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad token distinct from EOS and a chat template; returns it."""
    if tokenizer.eos_token_id is None:
        raise QLoraKitError("the tokenizer has no EOS token: the model could not learn to stop")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        candidates = [tokenizer.unk_token, tokenizer.bos_token, *tokenizer.all_special_tokens,
                      "<|endoftext|>", "<pad>", "<|pad|>"]
        vocab = tokenizer.get_vocab()
        pad = next((t for t in candidates if t and t in vocab and vocab[t] != tokenizer.eos_token_id), None)
        if pad is None:
            raise QLoraKitError("the tokenizer has no token to pad with other than EOS; add a pad token "
                                "to its tokenizer_config.json")
        tokenizer.pad_token = pad
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE
    return tokenizer


def tokenize(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one record, labels -100 where no loss is wanted."""
    if example_kind(record) == "text":
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids, list(ids)
    messages = to_messages(record)
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    spans = []  # character spans of assistant replies (end-of-turn token included)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(messages[:i], True))
            end = len(render(messages[:i + 1], False))
            spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(s <= a < e for s, e in spans) else IGNORE_INDEX
              for t, (a, _) in zip(ids, enc["offset_mapping"])]
    if tokenizer.eos_token_id not in [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return ids, labels


@dataclass
class Dataset:
    examples: list[tuple[list[int], list[int]]]
    stats: DataStats

    def __len__(self) -> int:
        return len(self.examples)


def build_dataset(records: list[dict], tokenizer, max_seq_len: int, stats: DataStats | None = None) -> Dataset:
    stats = stats if stats is not None else DataStats()
    examples = []
    longest = 0
    for record in records:
        ids, labels = tokenize(record, tokenizer)
        longest = max(longest, len(ids))
        if len(ids) > max_seq_len:
            stats.truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            stats.dropped_all_masked += 1
            continue
        examples.append((ids, labels))
    if not examples:
        raise QLoraKitError(f"every example is longer than data.max_seq_len={max_seq_len} (the longest has "
                            f"{longest} tokens) and nothing is left to train on: raise max_seq_len")
    stats.examples = len(examples)
    stats.tokens = sum(len(ids) for ids, _ in examples)
    return Dataset(examples, stats)


def split(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A fixed held-out split (shuffled with `seed`); at least one eval example when asked for."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= len(records):
        raise QLoraKitError(f"only {len(records)} examples: too few to hold out {eval_fraction:.0%} for evaluation")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int,
            pack_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked from attention and loss.

    With pack_to, the examples share rows of at most pack_to tokens when that computes fewer tokens
    than padding each one (see `pack_rows`); the batch then has position_ids and no attention_mask."""
    if pack_to is not None:
        rows = pack_rows([len(ids) for ids, _ in batch], pack_to)
        width = max(sum(len(batch[i][0]) for i in row) for row in rows)
        if len(rows) * width < len(batch) * max(len(ids) for ids, _ in batch):
            return _packed(batch, rows, width, pad_id)
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the examples grouped into rows of at most `capacity` tokens: best fit, longest first
    (each example goes to the fullest row that still has room for it)."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), kept sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            rows.append([i])
            bisect.insort(room, (capacity - lengths[i], len(rows) - 1))
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            bisect.insort(room, (free - lengths[i], row))
    return rows


def _packed(batch: list[tuple[list[int], list[int]]], rows: list[list[int]], width: int,
            pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of whole examples, each with position ids from 0. transformers reads restarting position
    ids without an attention mask as packed sequences and confines attention to each one (a
    block-diagonal causal mask with SDPA or eager attention, varlen kernels with flash-attention). The
    first token of an example is never a target (it would be predicted from the example before it),
    as it is not when the example runs alone; padding is one more sequence, attending only to itself."""
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, labs = batch[i]
            input_ids[r, at:at + len(ids)] = torch.tensor(ids)
            labels[r, at + 1:at + len(ids)] = torch.tensor(labs[1:])
            positions[r, at:at + len(ids)] = torch.arange(len(ids))
            at += len(ids)
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run sees exactly the batches the interrupted one would have."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def microbatches(dataset: Dataset, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
    """Yield (global_index, batch) forever, from global micro-batch `start`; rank r takes every world-th one.

    Epochs run back to back, each in its own fixed order; the last partial batch of an epoch is kept."""
    per_epoch = -(-len(dataset) // batch_size)
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        if index % world == rank:
            order = epoch_order(len(dataset), epoch, seed)
            chosen = order[offset * batch_size:(offset + 1) * batch_size]
            yield index, [dataset.examples[i] for i in chosen]
        index += 1
