"""Preference pairs and the losses that learn from them: DPO (and its IPO and hinge variants) and ORPO.

Data is TRL's preference format, one JSON object a line, either all strings

    {"prompt": "Who wrote Hamlet?", "chosen": "Shakespeare.", "rejected": "Marlowe, I think."}

or conversational: `prompt` a list of messages, `chosen` / `rejected` lists holding the assistant turn

    {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", "content": "..."}], ...}

Each side is rendered with the chat template as one conversation, prompt + response, and only the
response's tokens are scored. Truncation is SFT's: a sequence longer than max_seq_len is cut at the end,
so the prompt is kept first, and every cut is counted.

The losses, on sequence log-probabilities log pi(y|x) summed over the response tokens:

    DPO    z = beta * [(log pi(yc) - log ref(yc)) - (log pi(yr) - log ref(yr))]
           sigmoid: -log sigmoid(z)      hinge: max(0, 1 - z)
           ipo: (z / beta - 1 / (2 beta))^2, on log-probabilities averaged per token (as TRL does)
    ORPO   -beta * log sigmoid(log odds(yc) - log odds(yr)),  odds(y) = p / (1 - p), p the per-token
           mean probability exp(mean log pi(y)); added to the SFT loss on the chosen response

The reference log ref(y) is the same model with its adapters disabled (`adapt.adapters_disabled`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapt import adapters_disabled
from .data import CHAT_ROLES, DataStats, collate
from .errors import QLoraKitError, closest
from .losses import IGNORE_INDEX, sequence_logps

METHODS = ("sft", "dpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
PAIR_KEYS = ("prompt", "chosen", "rejected")


def _messages(value, what: str, last_role: str | None = None) -> list[dict]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise QLoraKitError(f"'{what}' must be a non-empty list of {{\"role\", \"content\"}} strings")
    unknown = [m["role"] for m in value if m["role"] not in CHAT_ROLES]
    if unknown:
        raise QLoraKitError(f"'{what}' has role {unknown[0]!r}{closest(unknown[0], CHAT_ROLES)}; chat roles are "
                            f"{', '.join(CHAT_ROLES)}")
    if last_role and value[-1]["role"] != last_role:
        raise QLoraKitError(f"'{what}' must end with the {last_role} turn (it ends with a {value[-1]['role']!r} one)")
    return value


def pair_messages(record) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) as message lists, after checking the record; a clear error otherwise."""
    if not isinstance(record, dict):
        raise QLoraKitError("each line must be a JSON object")
    missing = [k for k in PAIR_KEYS if k not in record]
    if missing:
        raise QLoraKitError(f"a preference pair needs 'prompt', 'chosen' and 'rejected'; this one lacks "
                            f"{', '.join(repr(k) for k in missing)} (keys: {sorted(record)})")
    prompt, chosen, rejected = (record[k] for k in PAIR_KEYS)
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        empty = [k for k in PAIR_KEYS if not record[k].strip()]
        if empty:
            raise QLoraKitError(f"{', '.join(repr(k) for k in empty)} is empty")
        prompt = [{"role": "user", "content": prompt}]
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    elif all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        prompt = _messages(prompt, "prompt")
        chosen, rejected = _messages(chosen, "chosen", "assistant"), _messages(rejected, "rejected", "assistant")
    else:
        kinds = {k: type(record[k]).__name__ for k in PAIR_KEYS}
        raise QLoraKitError(f"prompt, chosen and rejected must be all strings or all message lists (got {kinds})")
    if chosen == rejected:
        raise QLoraKitError("'chosen' and 'rejected' are the same response: the pair prefers nothing (drop it, or "
                            "set data.on_bad_line: skip)")
    return prompt, chosen, rejected


def encode_response(prompt: list[dict], response: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + response rendered as one chat; labels only on the response."""
    def render(messages: list[dict], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    head, full = render(prompt, True), render(prompt + response, False)
    if not full.startswith(head):
        raise QLoraKitError("the chat template renders the prompt differently once a response follows it, so the "
                            "response's tokens cannot be told apart: use a template whose prompt is a prefix")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if a >= len(head) else IGNORE_INDEX for t, (a, _) in zip(ids, enc["offset_mapping"])]
    if tokenizer.eos_token_id not in [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return ids, labels


@dataclass
class PairExample:
    chosen: tuple[list[int], list[int]]     # (input_ids, labels)
    rejected: tuple[list[int], list[int]]
    ref: tuple[float, float] | None = None  # precomputed reference log-probabilities (chosen, rejected)


def collate_pairs(pairs: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch holding every chosen response, then every rejected one (one forward pass for both);
    `ref_logps` in the same order when the pairs carry precomputed references."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    if all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float32)
    return batch


def build_pairs(records: list[dict], tokenizer, max_seq_len: int, stats: DataStats | None = None) -> list[PairExample]:
    """Tokenised pairs, each side cut to max_seq_len (counted in stats.truncated); a pair with a side that has
    no response token left is dropped (stats.dropped_all_masked)."""
    stats = stats if stats is not None else DataStats()
    pairs = []
    for record in records:
        prompt, chosen, rejected = pair_messages(record)
        sides = []
        for response in (chosen, rejected):
            ids, labels = encode_response(prompt, response, tokenizer)
            if len(ids) > max_seq_len:
                stats.truncated += 1
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            sides.append((ids, labels))
        if any(all(lab == IGNORE_INDEX for lab in labels[1:]) for _, labels in sides):
            stats.dropped_all_masked += 1
            continue
        pairs.append(PairExample(*sides))
    if not pairs:
        raise QLoraKitError(f"no preference pair keeps a response token within data.max_seq_len={max_seq_len}: "
                            "raise max_seq_len or shorten the prompts")
    stats.examples = len(pairs)
    stats.tokens = sum(len(p.chosen[0]) + len(p.rejected[0]) for p in pairs)
    return pairs


# ---------------------------------------------------------------- losses

def check_loss_type(loss_type: str) -> str:
    if loss_type not in DPO_LOSSES:
        raise QLoraKitError(f"unknown DPO loss_type {loss_type!r}{closest(str(loss_type), DPO_LOSSES)}: use one of "
                            f"{', '.join(DPO_LOSSES)}")
    return loss_type


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from sequence log-probabilities, shape (pairs,).

    Rewards are beta * (log pi - log ref), detached: what TRL logs as rewards/chosen and rewards/rejected."""
    check_loss_type(loss_type)
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * margin)
    else:
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_odds_ratio(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor,
                    beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair odds-ratio losses -beta * log sigmoid(log odds ratio), the log odds ratio) from per-token
    mean log-probabilities of the chosen and rejected responses."""
    log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-torch.exp(chosen_mean))
                                                - torch.log1p(-torch.exp(rejected_mean)))
    return -beta * F.logsigmoid(log_odds), log_odds


class PreferenceLoss(nn.Module):
    """Model + preference loss as one module (so a data-parallel wrapper sees the whole forward).

    forward(batch of collate_pairs) -> (mean loss over the pairs, number of pairs, metrics named as TRL
    names them: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
    logps/rejected; ORPO adds nll_loss and log_odds_ratio). DPO's reference pass runs the same model
    with its adapters off, without gradients, unless the batch brings precomputed `ref_logps`."""

    def __init__(self, model: nn.Module, method: str, beta: float = 0.1, loss_type: str = "sigmoid",
                 chunk_tokens: int = 1024):
        super().__init__()
        if method not in ("dpo", "orpo"):
            raise QLoraKitError(f"PreferenceLoss is for method dpo or orpo, not {method!r}")
        self.model, self.method, self.beta = model, method, beta
        self.loss_type, self.chunk_tokens = check_loss_type(loss_type), chunk_tokens

    def reference_logps(self, input_ids, labels, attention_mask=None) -> torch.Tensor:
        with torch.no_grad(), adapters_disabled(self.model):
            return sequence_logps(self.model, input_ids, labels, attention_mask, self.chunk_tokens)[0]

    def forward(self, input_ids, labels, attention_mask=None, ref_logps=None):
        n = input_ids.shape[0] // 2
        logps, counts = sequence_logps(self.model, input_ids, labels, attention_mask, self.chunk_tokens)
        counts = counts.clamp(min=1).to(logps.dtype)
        stats = {}
        if self.method == "dpo":
            ref = self.reference_logps(input_ids, labels, attention_mask) if ref_logps is None else ref_logps
            # IPO's loss is on per-token averages (as TRL's); its rewards, like every variant's, on sums
            policy, base = (logps / counts, ref / counts) if self.loss_type == "ipo" else (logps, ref)
            losses, _, _ = dpo_loss(policy[:n], policy[n:], base[:n], base[n:], self.beta, self.loss_type)
            loss = losses.mean()
            chosen, rejected = (self.beta * (logps - ref).detach()).split(n)
        else:
            mean = logps / counts
            nll = -logps[:n].sum() / counts[:n].sum()
            ratio, log_odds = orpo_odds_ratio(mean[:n], mean[n:], self.beta)
            loss = nll + ratio.mean()
            chosen, rejected = self.beta * mean[:n].detach(), self.beta * mean[n:].detach()
            stats = {"nll_loss": nll.detach(), "log_odds_ratio": log_odds.detach().mean()}
        stats = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                 "rewards/margins": (chosen - rejected).mean(),
                 "rewards/accuracies": (chosen > rejected).float().mean(),
                 "logps/chosen": logps[:n].detach().mean(), "logps/rejected": logps[n:].detach().mean(), **stats}
        return loss, n, stats
