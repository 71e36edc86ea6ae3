"""Causal-LM loss that never holds the full logits tensor.

With 49k-150k vocabularies, fp32 logits for a batch dominate training memory (batch 4 x seq 2048 x
128k vocab x 4 bytes = 4 GiB, twice with their gradient). Here the output head and cross-entropy
run over chunks of positions, each under activation checkpointing, so at most one chunk of logits
exists at a time, forward or backward. Positions whose label is ignored (prompt tokens, padding)
are dropped before the head, which also saves their matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_lm_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                    chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of tokens) for next-token prediction.

    hidden: (batch, seq, dim) final hidden states; labels: (batch, seq) with IGNORE_INDEX where no
    loss is wanted. Shifts by one position internally, as transformers does."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    n = int(y.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    if n == 0:
        return total + 0.0 * hidden.sum(), 0  # keeps the graph connected
    for start in range(0, n, chunk_tokens):
        hs, ys = h[start:start + chunk_tokens], y[start:start + chunk_tokens]
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_loss, head, hs, ys, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hs, ys)
    return total, n


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """Run the decoder body, then `chunked_lm_loss` on its output head. Returns (mean loss, tokens)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    total, n = chunked_lm_loss(model.get_output_embeddings(), out.last_hidden_state, labels, chunk_tokens)
    return total / max(n, 1), n
