"""Causal-LM loss that never holds the full logits tensor.

With 49k-150k vocabularies, fp32 logits for a batch dominate training memory (batch 4 x seq 2048 x
128k vocab x 4 bytes = 4 GiB, twice with their gradient). Here the output head and cross-entropy
run over chunks of positions, so at most one chunk of logits exists at a time. A frozen head (the
LoRA case) gets its input gradient computed while each chunk's logits exist, so the head's matmul
runs twice per step, as in an unchunked loss; a trainable head falls back to checkpointing each
chunk (three matmuls). Positions whose label is ignored (prompt tokens, padding) are dropped
before the head, which also saves their matmul.

`LossScaler` keeps fp16 training's loss inside fp16's range (dynamic loss scaling); with bf16 or
fp32 compute it does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import QLoraKitError
from .memory import release_freed_memory

IGNORE_INDEX = -100


@dataclass(frozen=True)
class HeadTransform:
    """What a model does to its head's output before the softmax: logits = cap * tanh(scale * z / cap)
    with z = head(hidden). Granite divides by logits_scaling, Cohere multiplies by logit_scale, Gemma 2
    soft-caps at final_logit_softcapping; a loss that skipped these would train another model."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> "HeadTransform":
        config = getattr(model, "config", None)
        scale = 1.0 / float(getattr(config, "logits_scaling", None) or 1.0)
        scale *= float(getattr(config, "logit_scale", None) or 1.0)
        cap = getattr(config, "final_logit_softcapping", None)
        return cls(scale, float(cap) if cap else None)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        z = z * self.scale if self.scale != 1.0 else z
        return torch.tanh(z / self.softcap) * self.softcap if self.softcap else z

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """The same, in place, on a tensor that no autograd graph holds."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        return z.div_(self.softcap).tanh_().mul_(self.softcap) if self.softcap else z

    def logit_grad_(self, logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Turn a block of rows of transformed fp32 logits, in place, into d(sum of token losses) / d z:
        (softmax - one_hot(labels)) times d logits / d z. In place: with fp32 compute the block is a
        chunk's own logits, the loss's whole peak."""
        rows = torch.arange(labels.numel(), device=labels.device)
        if not self.softcap:
            logits.sub_(lse[:, None]).exp_()
            logits[rows, labels] -= 1.0
            return logits.mul_(self.scale) if self.scale != 1.0 else logits
        # d logits / d z = scale * (1 - (logits / cap)^2): made a block of rows at a time, so the
        # only extra buffer is one block's, and applied to the one-hot part at the labels as well.
        at_labels = torch.empty_like(lse)
        for r in range(0, logits.shape[0], 128):
            block = logits[r:r + 128]
            slope = block.div(self.softcap).square_().neg_().add_(1.0).mul_(self.scale)
            at_labels[r:r + 128] = slope.gather(1, labels[r:r + 128, None]).squeeze(1)
            block.sub_(lse[r:r + 128, None]).exp_().mul_(slope)
        logits[rows, labels] -= at_labels
        return logits


IDENTITY = HeadTransform()
# The loss works on blocks of rows of a chunk's logits, in fp32: on the CPU, 2 MiB (under
# qlora_kit.memory's mmap threshold, so reused from the heap, never faulted in, and warm in cache);
# on a GPU larger blocks, so that kernel launches do not add up (a 128k vocabulary: 128 rows a block).
LOSS_BLOCK_BYTES_CPU = 2 << 20
LOSS_BLOCK_BYTES_ACCELERATOR = 64 << 20


def loss_block_rows(vocab: int, device: str | torch.device = "cpu") -> int:
    """Rows of fp32 logits per block of the loss on this device (at least one)."""
    cpu = getattr(device, "type", device) == "cpu"
    return max(1, (LOSS_BLOCK_BYTES_CPU if cpu else LOSS_BLOCK_BYTES_ACCELERATOR) // (4 * vocab))


def rows_loss_(z: torch.Tensor, labels: torch.Tensor, transform: HeadTransform, want_grad: bool) -> torch.Tensor:
    """Sum of the cross-entropy of z's rows (a chunk of head outputs) against labels, computed in
    fp32 a block of rows at a time; with want_grad, z is overwritten with d(sum) / dz, in its own
    dtype, ready for the head's input gradient.

    16-bit z: each block is cast to fp32, transformed, scored and turned into its gradient, then
    written back over z's rows; the only fp32 buffers are a block and logsumexp's scratch, never a
    whole chunk (a 1024-token chunk of a 128k vocabulary: 525 MB of fp32 logits not made). fp32 z is
    worked on in place."""
    rows = loss_block_rows(z.shape[-1], z.device)
    total = torch.zeros((), dtype=torch.float32, device=z.device)
    for r in range(0, z.shape[0], rows):
        block = transform.apply_(z[r:r + rows].float())  # fp32 z: its own rows, not a copy
        y = labels[r:r + rows]
        lse = torch.logsumexp(block, dim=-1)
        total += (lse - block.gather(1, y[:, None]).squeeze(1)).sum()
        if want_grad:
            grad = transform.logit_grad_(block, lse, y)
            if z.dtype != torch.float32:
                z[r:r + rows].copy_(grad)
    return total


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of token losses through a frozen linear head, chunk by chunk, with the gradient of its
    input computed in the forward pass while each chunk's logits exist.

    The checkpointed alternative multiplies by the head three times (forward, recomputed forward,
    input gradient); this does it twice, like an unchunked loss, and keeps one chunk of logits at
    a time, in the compute dtype (rows_loss_ scores them in fp32 blocks and overwrites them with
    their gradient). What it keeps for backward is d(loss)/d(hidden): the size of `hidden` itself."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, transform):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
            z = F.linear(h, weight, bias)
            total += rows_loss_(z, y, transform, want_grad=grad is not None)
            if grad is not None:  # z holds softmax - one_hot(y), through the transform: through the head
                torch.matmul(z, weight, out=grad[start:start + chunk_tokens])
            del z  # before the next chunk's logits exist
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None


def _frozen_linear(head: torch.nn.Module) -> bool:
    return (type(head) is torch.nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad) and not head._forward_hooks
            and not head._forward_pre_hooks)


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                transform: HeadTransform) -> torch.Tensor:
    logits = transform(head(hidden).float())
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_lm_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                    chunk_tokens: int = 1024, transform: HeadTransform = IDENTITY) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of tokens) for next-token prediction.

    hidden: (batch, seq, dim) final hidden states; labels: (batch, seq) with IGNORE_INDEX where no
    loss is wanted. Shifts by one position internally, as transformers does. transform: the model's
    own scaling or soft-capping of the logits (HeadTransform.of(model))."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    n = int(y.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    if n == 0:
        return total + 0.0 * hidden.sum(), 0  # keeps the graph connected
    if _frozen_linear(head):  # the usual case: LoRA never trains the head
        return _FrozenHeadCrossEntropy.apply(h, head.weight, head.bias, y, chunk_tokens, transform), n
    for start in range(0, n, chunk_tokens):
        hs, ys = h[start:start + chunk_tokens], y[start:start + chunk_tokens]
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_loss, head, hs, ys, transform, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hs, ys, transform)
    return total, n


def _chunk_token_logps(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                       transform: HeadTransform) -> torch.Tensor:
    logits = transform(head(hidden).float())
    return logits.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _between_body_and_head(hidden: torch.Tensor) -> None:
    """On the CPU, hand the blocks' freed scratch back before the logits arrive (qlora_kit.memory):
    a checkpointed forward pass frees each block's internals into glibc's heap, which would keep them
    resident through the loss, the usual peak of a step."""
    if torch.is_grad_enabled():
        release_freed_memory(hidden.device)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None,
                   chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) per sequence, labelled tokens per sequence), both of shape (batch,).

    What preference losses compare: each response's log-probability under the model. The head runs
    over chunks of labelled positions, each recomputed in the backward pass (checkpointed), so no
    more than one chunk of logits exists at a time, as in `chunked_lm_loss`."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    _between_body_and_head(hidden)
    head, transform = model.get_output_embeddings(), HeadTransform.of(model)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    rows = torch.arange(labels.shape[0], device=labels.device).repeat_interleave(labels.shape[1] - 1)
    keep = y != IGNORE_INDEX
    h, y, rows = h[keep], y[keep], rows[keep]
    sums = hidden.new_zeros(labels.shape[0], dtype=torch.float32) + 0.0 * hidden.sum()  # graph stays connected
    for start in range(0, int(y.numel()), chunk_tokens):
        hs, ys = h[start:start + chunk_tokens], y[start:start + chunk_tokens]
        if torch.is_grad_enabled() and hs.requires_grad:
            part = checkpoint(_chunk_token_logps, head, hs, ys, transform, use_reentrant=False)
        else:
            part = _chunk_token_logps(head, hs, ys, transform)
        sums = sums.index_add(0, rows[start:start + chunk_tokens], part)
    counts = torch.bincount(rows, minlength=labels.shape[0])
    return sums, counts


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk_tokens: int = 1024,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Run the decoder body, then `chunked_lm_loss` on its output head. Returns (mean loss, tokens).
    position_ids that restart within a row (and no attention_mask) mark packed examples (data.collate)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    _between_body_and_head(out.last_hidden_state)
    total, n = chunked_lm_loss(model.get_output_embeddings(), out.last_hidden_state, labels, chunk_tokens,
                               HeadTransform.of(model))
    return total / max(n, 1), n


class LossScaler:
    """Dynamic loss scaling for fp16 compute (torch.amp.GradScaler), and the count of skipped steps.

    fp16 keeps 5 exponent bits: gradients below 6e-8 flush to zero, and one large activation
    gradient overflows. The scaler multiplies the loss by 2^16 before the backward pass, unscales
    the gradients before clipping, and skips the optimiser step when any of them is inf/NaN,
    halving the scale; after 2000 clean steps it doubles it. bf16 and fp32 have fp32's exponent
    range and need none of this: the scaler is then a no-op."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled)
        self.skipped = 0          # steps skipped in this run, resumed part included
        self.skipped_in_a_row = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale(self, optimizer) -> None:
        if self.enabled:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """Step unless the gradients overflowed; True when the step was taken."""
        if not self.enabled:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        taken = self.scaler.get_scale() >= before
        self.skipped_in_a_row = 0 if taken else self.skipped_in_a_row + 1
        self.skipped += not taken
        return taken

    @property
    def scale_value(self) -> float:
        return self.scaler.get_scale()

    def state_dict(self) -> dict:
        return {**self.scaler.state_dict(), "skipped": self.skipped, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict | None, where: Path) -> None:
        if state is None:
            raise QLoraKitError(f"checkpoint {where} holds no loss scale: it was written by a bf16/fp32 run, and "
                                "this run computes in fp16; resume it with the compute dtype it was trained with")
        state = dict(state)
        self.skipped, self.skipped_in_a_row = state.pop("skipped", 0), state.pop("skipped_in_a_row", 0)
        self.scaler.load_state_dict(state)
