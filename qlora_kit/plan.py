"""How much memory a QLoRA run needs, computed from the model's config before anything is loaded.

Owns the memory model: the bytes of each component of a training step's peak (COMPONENTS), the
terms behind them, the fitted overhead constants with the measurements they come from, MemoryPlan
and plan_memory. The model's shape comes from qlora_kit.shapes, optimiser state from
qlora_kit.optim; whether a plan fits a card or this device is qlora_kit.fit's question.

Three kinds of numbers live here. Static bytes (quantised weights and their constants, unquantised
weights, adapters, their gradients, optimiser state) are exact: they repeat, tensor for tensor, what
`load_model`, `add_lora` and the optimisers allocate. Dynamic bytes (activations, logits and their
temporaries, the dequantised weight) are derived from the shapes and the compute dtype: they follow
the tensors a step really creates, read off with saved-tensor hooks and a live-tensor counter
(tests/test_plan.py), for fp32, bf16 and fp16 alike. Only the framework overhead is fitted or
assumed: on CPU, the interpreter's resident memory and what a step adds besides tensors, fitted on
fp32, bf16 and fp16 runs (benchmarks/plan_accuracy.py); on CUDA, the context and the caching
allocator's margin, assumed until a GPU measures them.

What stays alive with per-block, non-reentrant gradient checkpointing:
  * every decoder block's input hidden state (batch x seq x hidden, compute dtype);
  * during the backward pass, one block recomputed with everything its backward needs, plus the
    gradients flowing through it;
  * the chunked loss (losses.py): one chunk's logits in the compute dtype, two blocks of fp32
    rows, and the hidden-sized tensors around the head.
Without checkpointing every block keeps its internals from the forward pass to the backward pass.
Checkpointing some blocks mixes the two; the first ones are checkpointed, because the backward pass
reaches them last: by then the unchecked blocks' internals are freed, so only one of the two kinds
of peak carries the other's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import QLoraKitError, closest
from .lora import LoraConfig
from .losses import loss_block_rows
from .memory import policy as allocator_policy
from .optim import DEFAULT_OPTIMIZER, OPTIMIZERS, optimizer_bytes
from .quant import QuantConfig, dtype_name, resolve_dtype
from .modeltree import checkpointed_blocks
from .shapes import FAMILIES, ModelShape, resolve_shape, target_layers

GiB = 1024 ** 3
MiB = 1024 ** 2


# Framework overhead (the `overhead` line); the only terms here that are not derived from shapes.
# CPU, fitted with benchmarks/plan_accuracy.py on fp32, bf16 and fp16 runs (AVX512-BF16 EPYC, torch
#   2.13, glibc's mmap threshold fixed by qlora_kit.memory and its heap trimmed between phases of a
#   step; not yet re-measured on an AVX2-only machine):
#   - the interpreter with torch, transformers and bitsandbytes imported, and what loading leaves
#     besides the model's tensors (heap, kernel code paged in): resident set after `load_model`
#     minus the static bytes, 399-402 MiB over 3 model sizes, bf16 and fp32;
#   - what a training step adds besides tensors (heap of small blocks, more kernel code, BLAS
#     buffers): peak RSS minus RSS before the steps minus the step's tensors, 18-87 MiB (fp32
#     18-87, bf16 21-58; fp16 22-33 before the 4 MiB threshold).
#   Freed step tensors of 4 MiB and more leave the resident set at once under that threshold, and
#   smaller ones are trimmed from the heap after each block (hidden states of 1 MiB or more: after
#   an unchecked one's forward pass, after every one's backward pass), before the logits and after
#   each step, so the CPU plan has no fragmentation term
#   (without the per-block trims a 12-layer, 1024-wide Llama with no block checkpointed peaked 9%
#   over its plan at the end of the forward pass, and from the third step on 5-7% over it at the end
#   of the backward pass, where glibc placed new tensors on trimmed pages while freed ones stayed
#   resident; with them, on plan within 1%). (The 560 MiB + 50% of the step's bytes used before were fitted when
#   glibc kept freed blocks resident.)
# CUDA, assumed, not yet measured (scripts/gpu_check.sh will): the CUDA context, cuBLAS workspaces
#   and loaded kernels (about 0.5 GiB with lazy module loading, CUDA >= 11.7), plus the caching
#   allocator's fragmentation, taken as 20% of the bytes that come and go during a step
#   (activations and logits); weights are allocated once and do not fragment.
CPU_INTERPRETER_BYTES = 400 * MiB
CPU_STEP_RUNTIME_BYTES = 40 * MiB
CUDA_CONTEXT_BYTES = 512 * MiB
CUDA_FRAGMENTATION = 0.20


# ---------------------------------------------------------------------------------------------
# Exact static bytes


def quantized_bytes(numel: int, rows: int, quant: QuantConfig) -> tuple[int, int]:
    """(packed weight bytes, constant bytes) of one linear weight, as bitsandbytes allocates them."""
    if quant.bits == 8:
        return numel, 4 * rows                                   # int8 + one fp32 scale per row
    blocks = -(-numel // quant.blocksize)
    packed = -(-numel // 2)                                      # two 4-bit codes per byte
    if not quant.double_quant:
        return packed, 4 * blocks + 4 * 16                       # fp32 absmax + 16-entry code
    nested = -(-blocks // 256)
    return packed, blocks + 4 * nested + 4 * 16 + 4 * 256 + 4    # uint8 absmax, fp32 nested absmax, codes, offset


# ---------------------------------------------------------------------------------------------
# Activations


def block_saved_per_token(shape: ModelShape, lora: LoraConfig, targeted: set[str], cb: int) -> float:
    """Bytes per token that one decoder block keeps for its backward pass, besides its input.

    Read off the tensors autograd saves (tests/test_plan.py counts them with saved-tensor hooks).
    QuantLinear saves no input (its weight is frozen and dequantised again in backward), so what is
    saved is the norms' inputs (qlora_kit.norms keeps them in the compute dtype) and 1/rms per row,
    the LoRA branches' inputs, attention's q/k/v/output/logsumexp, and the MLP's gate, act(gate) and
    up outputs. The first norm's input is the block's input, counted by the caller."""
    h, i = shape.hidden, shape.mlp_width
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    ab = torch.finfo(lora.dtype).bits // 8
    dropout = lora.dropout > 0
    one_mask = dropout and lora.shared_dropout  # siblings share the dropped input and its bool mask

    def branch(suffix: str, width: int) -> float:
        """A LoRA branch: its dropped input and bool mask (unless shared), or a cast copy; A's output."""
        if suffix not in targeted:
            return 0.0
        if dropout:
            own_input = 0 if one_mask else (1 + ab) * width
        else:
            own_input = ab * width if ab != cb else 0
        return own_input + ab * lora.r

    def shared(suffixes: tuple[str, ...], width: int) -> float:
        """What sibling branches save once: the shared dropped input and mask, or the undropped,
        uncast input itself."""
        if not targeted & set(suffixes):
            return 0
        if one_mask:
            return (1 + ab) * width
        return cb * width if not dropout and ab == cb else 0

    total = (shape.norms_per_layer - 1) * cb * h + shape.norms_per_layer * 4   # the norms' inputs and 1/rms
    total += shared(("q_proj", "k_proj", "v_proj"), h) + sum(branch(s, h) for s in ("q_proj", "k_proj", "v_proj"))
    total += cb * (2 * q + 2 * kv) + 4 * shape.heads    # rotated q, k; v; attention output; logsumexp
    if shape.qk_norm:   # per head: q and k before their norms, and 1/rms
        total += cb * (q + kv) + 4 * (shape.heads + shape.kv_heads)
    # undropped, o_proj's input is attention's output, which attention saves already
    total += (shared(("o_proj",), q) if one_mask else 0) + branch("o_proj", q)
    total += shared(("gate_proj", "up_proj"), h) + branch("gate_proj", h) + branch("up_proj", h)
    total += 3 * cb * i                                 # gate, act(gate), up
    total += shared(("down_proj",), i) + branch("down_proj", i)
    return total


def block_constants(shape: ModelShape, lora: LoraConfig, targeted: set[str]) -> int:
    """Bytes that one block's adapters save whatever the tokens: each B scaled (and cast) for the
    forward pass, and each A cast to the adapter dtype where that is not fp32."""
    ab = torch.finfo(lora.dtype).bits // 8
    total = 0
    for name, a, b, _ in shape.linears():
        if name.rsplit(".", 1)[-1] in targeted:
            total += ab * lora.r * b + (ab * lora.r * a if ab != 4 else 0)
    return total


def block_backward_transient(shape: ModelShape, tokens: int, cb: int, quant: QuantConfig | None,
                              checkpointed: bool) -> int:
    """The most that one block's backward pass creates at once, on top of what the block saved.

    Counted with a live-tensor counter (tests/test_plan.py). Two moments compete. The MLP's: with
    checkpointing, while the up projection's input gradient is computed (the gradients of act(gate)
    and up, the gate projection's input gradient and the residual stream's, the dequantised weight
    and the matmul's output), everything the block saved is still alive, because LoRA's
    shared-dropout slot holds the recomputed down_proj input and with it the recomputed graph;
    without checkpointing the saved tensors go as their backward runs, so the peak comes earlier,
    in down_proj's backward. One weight exists dequantised at a time (the largest), in the compute
    dtype; LLM.int8 makes an fp32 copy first, gone before the matmul writes its output. And the
    post-attention norm's moment (qlora_kit.norms, whose backward runs in fp32): its incoming and
    outgoing gradients in the compute dtype and two fp32 temporaries of the hidden size (an
    accelerator's; the CPU's work in blocks of rows, so this errs high there)."""
    h, i = shape.hidden, shape.mlp_width
    if checkpointed:
        grads, out = (2 * cb * i + 2 * cb * h) * tokens, cb * h * tokens
    else:
        grads, out = (cb * i + cb * h) * tokens, cb * i * tokens
    largest = max(a * b for _, a, b, _ in shape.linears() + shape.expert_linears())
    weight = 0 if quant is None else cb * largest
    int8_copy = 4 * largest if quant is not None and quant.bits == 8 and cb != 4 else 0
    mlp = grads + weight + max(out, int8_copy)
    norm = (2 * 4 * h + 2 * cb * h) * tokens
    return max(mlp, norm)


def shared_dropout_bytes(shape: ModelShape, lora: LoraConfig, targeted: set[str], tokens: int) -> int:
    """The dropped input that LoRA's shared-dropout slot still holds after a block's forward pass
    (qlora_kit.lora keeps the last one, for siblings that read the same input): the input of the
    block's last adapter, in the adapter dtype. With checkpointing it outlives the block."""
    if lora.dropout == 0 or not lora.shared_dropout:
        return 0
    ab = torch.finfo(lora.dtype).bits // 8
    last = [a for name, a, _, _ in shape.linears() if name.rsplit(".", 1)[-1] in targeted][-1]
    return ab * last * tokens


def loss_bytes(shape: ModelShape, tokens: int, chunk_tokens: int, cb: int, device: str = "cpu") -> int:
    """Peak of the chunked head + cross-entropy (qlora_kit.losses, frozen head): a chunk's logits in the
    compute dtype, which the loss overwrites with their gradient, and beside them two blocks of fp32
    rows (losses.loss_block_rows: 2 MiB on the CPU): a 16-bit block's fp32 copy and logsumexp's
    scratch (or soft-capping's slope); with fp32 compute the block is the chunk's own rows, and
    logsumexp's scratch or the slope the second. One chunk at a time: a chunk's logits are freed
    before the next one's exist. Plus the input gradient it keeps for backward (the size of the
    final hidden states)."""
    chunk = min(chunk_tokens, tokens)
    block = min(chunk, loss_block_rows(shape.vocab, device)) * 4 * shape.vocab
    logits = cb * chunk * shape.vocab + (2 if cb < 4 else 1) * block
    return logits + cb * tokens * shape.hidden


def checkpointing_label(settings: dict) -> str:
    """' no-ckpt', ' ckpt 12/30' or '' (every block checkpointed, the default) for a plan's summary."""
    k, layers = settings["checkpointed_blocks"], settings["layers"]
    return "" if k == layers else " no-ckpt" if k == 0 else f" ckpt {k}/{layers}"


# ---------------------------------------------------------------------------------------------
# The plan


COMPONENTS = {
    "quantized_weights": "quantised weights (packed)",
    "quant_constants": "quantisation constants",
    "unquantized_weights": "unquantised weights (embeddings, norms, head)",
    "adapters": "LoRA adapters (fp32)",
    "adapter_grads": "adapter gradients (fp32)",
    "optimizer_state": "optimiser state",
    "activations": "activations",
    "logits_loss": "logits and loss (chunked)",
    "overhead": "framework overhead",
}


@dataclass
class MemoryPlan:
    """Bytes per component of one training step's peak, and what they add up to."""

    model: str
    settings: dict
    components: dict[str, int]
    parameters: int
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)
    _inputs: dict = field(default_factory=dict, repr=False, compare=False)
    # mixtures of experts: experts, experts_per_token, active_parameters, expert_weight_bytes
    moe: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def weights(self) -> int:
        """Bytes of the model as loaded with its adapters (what inference needs, before activations)."""
        c = self.components
        return c["quantized_weights"] + c["quant_constants"] + c["unquantized_weights"] + c["adapters"]

    def fits(self, budget_bytes: int | float) -> bool:
        return self.total <= budget_bytes

    def with_settings(self, **changes) -> "MemoryPlan":
        """The same plan with other settings (batch, seq_len, ...)."""
        return plan_memory(**{**self._inputs, **changes})

    def max_batch_seq(self, budget_bytes: int | float, seq_lens: tuple[int, ...] | None = None) -> dict[int, int]:
        """{seq_len: largest batch that fits budget_bytes} (0 where even batch 1 does not fit)."""
        seq_lens = seq_lens or tuple(sorted({512, 1024, 2048, 4096, 8192, self.settings["seq_len"]}))
        out = {}
        for seq in seq_lens:
            lo, hi = 0, 1
            while self.with_settings(batch=hi, seq_len=seq).fits(budget_bytes) and hi < 1 << 16:
                lo, hi = hi, hi * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self.with_settings(batch=mid, seq_len=seq).fits(budget_bytes) else (lo, mid)
            out[seq] = lo
        return out

    def to_dict(self) -> dict:
        return {"model": self.model, "settings": self.settings, "components": dict(self.components),
                "total": self.total, "parameters": self.parameters,
                "trainable_parameters": self.trainable_parameters, "notes": list(self.notes),
                **({"moe": dict(self.moe)} if self.moe else {})}

    def summary(self) -> str:
        """One line for logs: the model, the settings that matter and the total."""
        s, c = self.settings, self.components
        quant = s.get("compute_dtype", "bf16") if s["quant"] is None else (
            f"{s['quant']['quant_type']}{'+dq' if s['quant']['double_quant'] else ''}" if s["quant"]["bits"] == 4 else "int8")
        static = self.total - c["activations"] - c["logits_loss"] - c["overhead"]
        return (f"memory plan: {self.model} {quant} r{s['r']} batch {s['batch']} x seq {s['seq_len']}"
                f"{checkpointing_label(s)} {s['optimizer']} on {s['device']}: "
                f"{self.total / GiB:.2f} GiB (static {static / GiB:.2f}, activations+logits "
                f"{(c['activations'] + c['logits_loss']) / GiB:.2f}, overhead {c['overhead'] / GiB:.2f})")


def plan_memory(model_or_config: Any, quant: QuantConfig | None = QuantConfig(), lora: LoraConfig | None = None,
                batch: int = 1, seq_len: int = 512, gradient_checkpointing: bool | int = True,
                optimizer: str = DEFAULT_OPTIMIZER, device: str = "cuda", chunk_tokens: int = 1024,
                dtype: torch.dtype | str | None = None) -> MemoryPlan:
    """Plan the memory of a QLoRA training step.

    model_or_config: a preset name ('llama-3.1-8b'), a model folder or config.json, a config dict or
    transformers config, or a loaded model. The other arguments are the run's settings, as the
    loader, `add_lora`, the optimiser and `causal_lm_loss` take them; gradient_checkpointing, as
    `set_gradient_checkpointing`'s: True (every block), False (none) or the number of blocks
    checkpointed, counted from the first; dtype, as `load_model`'s,
    defaults to quant.compute_dtype ('auto': the device's fast dtype). device 'cuda' adds the CUDA
    context and allocator overhead; 'cpu' adds the interpreter's resident memory.
    """
    lora = lora or LoraConfig()
    shape = resolve_shape(model_or_config)
    if device not in ("cuda", "cpu"):
        raise QLoraKitError(f"device={device!r}: plan for 'cuda' or 'cpu'")
    cdtype = resolve_dtype(dtype if dtype is not None else (quant.compute_dtype if quant is not None else "auto"),
                           device)
    if quant is not None:
        quant = replace(quant, compute_dtype=cdtype)
    if lora.dtype == "auto":  # adapters compute in the model's dtype, as add_lora does
        lora = replace(lora, dtype=cdtype)
    _check_settings(shape, lora, batch, seq_len, optimizer, device, chunk_tokens)
    blocks = checkpointed_blocks(gradient_checkpointing, shape.layers)
    cb = torch.finfo(cdtype).bits // 8

    qbytes = qconst = 0
    unquant = shape.vocab * shape.hidden * cb * (1 if shape.tied else 2)
    unquant += cb * shape.hidden * (shape.layers * shape.norms_per_layer + 1)
    unquant += cb * shape.layers * (2 * shape.head_dim if shape.qk_norm else 0)
    unquant += 4 * shape.rotary_tables * 2 * (shape.head_dim // 2)   # rotary inv_freq, original_inv_freq
    for _, a, b, bias in shape.linears():
        unquant += shape.layers * (cb * b if bias else 0)
        if quant is None:
            unquant += shape.layers * cb * a * b
        else:
            packed, const = quantized_bytes(a * b, b, quant)
            qbytes += shape.layers * packed
            qconst += shape.layers * const

    expert_bytes = 0  # all experts' weights: quantised like the linears, one matrix per expert and projection
    for _, a, b, _ in shape.expert_linears():
        if quant is None:
            expert_bytes += shape.layers * shape.experts * cb * a * b
        else:
            packed, const = quantized_bytes(a * b, b, quant)
            expert_bytes += shape.layers * shape.experts * (packed + const)
            qbytes += shape.layers * shape.experts * packed
            qconst += shape.layers * shape.experts * const
    if quant is None:
        unquant += expert_bytes
    unquant += cb * shape.layers * shape.experts * shape.hidden  # the routers, never quantised

    chosen = target_layers(shape, lora.targets)
    sizes = [n for _, a, b in chosen for n in (lora.r * a, lora.r * b)]
    if lora.target_experts and shape.experts:  # PEFT's layout: A (r * experts) x in, B out x (r * experts)
        sizes += [lora.r * shape.experts * n for _ in range(shape.layers)
                  for _, a, b, _ in shape.expert_linears() for n in (a, b)]
    elif lora.target_experts:
        raise QLoraKitError(f"target_experts=True, but {shape.name} has no experts: drop target_experts")
    trainable = sum(sizes)
    targeted = {name.rsplit(".", 1)[-1] for name, *_ in chosen}

    tokens = batch * seq_len
    h = shape.hidden
    k, free = blocks, shape.layers - blocks   # the first k blocks are checkpointed, the rest keep their internals
    per_block = block_saved_per_token(shape, lora, targeted, cb) * tokens + block_constants(shape, lora, targeted)
    residual = cb * h * tokens
    rotary = 2 * cb * seq_len * shape.head_dim * shape.rotary_tables   # cos and sin, shared by the blocks
    # Around the head: the final norm's input and its output, the loss's copy of the positions it
    # scores (the input gradient is in loss_bytes).
    final_norm = 3 * cb * h * tokens
    # Alive from the forward pass into the backward pass: a checkpointed block's input, an
    # unchecked block's saved internals. An unchecked block's first norm also saves the block's
    # input (which per_block leaves out), except the first block's: its input needs no gradient.
    norm_inputs = free * residual - (residual if k == 0 else 0)
    kept = k * residual + free * per_block + norm_inputs + rotary
    # While the loss runs, the previous step's loss tensor (alive until the new one replaces it)
    # still holds, through the first checkpointed block, its embedding output and one gradient of
    # the same size; and with every block checkpointed the shared-dropout slot holds the last
    # block's dropped input, which an unchecked last block saves anyway.
    around_loss = (2 * residual if k else 0) + (shared_dropout_bytes(shape, lora, targeted, tokens) if not free else 0)
    # The backward pass runs the loss (one chunk of logits at a time), then the blocks from the last:
    # the unchecked ones first, with all of them still holding their internals, then the
    # checkpointed ones, each recomputed, when only the checkpointed inputs are left.
    logits = loss_bytes(shape, batch * (seq_len - 1), chunk_tokens, cb, device)
    at_loss = kept + around_loss + final_norm
    in_blocks = max(kept + block_backward_transient(shape, tokens, cb, quant, False) if free else 0,
                    k * residual + rotary + per_block + block_backward_transient(shape, tokens, cb, quant, True)
                    if k else 0)
    loss_peak = at_loss + logits >= in_blocks
    activations = int(at_loss if loss_peak else in_blocks)
    logits = logits if loss_peak else 0

    dynamic = activations + logits
    if device == "cuda":
        overhead = CUDA_CONTEXT_BYTES + int(CUDA_FRAGMENTATION * dynamic)
    else:
        overhead = CPU_INTERPRETER_BYTES + CPU_STEP_RUNTIME_BYTES

    components = {
        "quantized_weights": qbytes, "quant_constants": qconst, "unquantized_weights": unquant,
        "adapters": 4 * trainable, "adapter_grads": 4 * trainable,
        "optimizer_state": optimizer_bytes(sizes, optimizer),
        "activations": activations, "logits_loss": logits, "overhead": overhead,
    }
    peak = "while the loss runs (head + cross-entropy)" if loss_peak else "during a decoder block's backward pass"
    notes = [f"peak {peak}"]
    moe = {}
    if shape.experts:
        moe = {"experts": shape.experts, "experts_per_token": shape.experts_per_token,
               "active_parameters": shape.active_parameters(), "expert_weight_bytes": expert_bytes}
        notes.append(f"{shape.experts} experts per block, {shape.experts_per_token} active per token: "
                     f"{shape.parameters() / 1e9:.1f}B parameters, {shape.active_parameters() / 1e9:.1f}B active; "
                     f"experts hold {expert_bytes / GiB:.2f} GiB of the weights; activations are planned as a dense "
                     f"MLP of width {shape.mlp_width} (top-k experts{' plus the shared one' if shape.shared_intermediate else ''})")
    if shape.family not in FAMILIES:
        notes.append(f"model_type {shape.family!r} is planned as a Llama-style decoder (q/k/v/o, gate/up/down)")
    if optimizer.startswith("paged") and device == "cuda":
        notes.append("paged optimiser state is counted on the GPU; under pressure it pages out to CPU RAM")
    if device == "cuda":
        notes.append("the CUDA overhead (context, allocator margin) is assumed, not yet measured on a GPU")
    elif allocator_policy() == "glibc":
        notes.append("QLORA_KIT_MALLOC_THRESHOLD=0: glibc keeps freed step tensors resident, which this plan "
                     "does not count (fp32 on a 1024-wide Llama: 2368 MiB instead of 1144; see qlora_kit.memory)")
    settings = {
        "quant": None if quant is None else quant.to_dict(), "r": lora.r, "alpha": lora.alpha,
        "compute_dtype": dtype_name(cdtype),
        "targets": lora.targets, "dropout": lora.dropout, "adapter_dtype": dtype_name(lora.dtype),
        "batch": batch, "seq_len": seq_len, "gradient_checkpointing": blocks if 0 < blocks < shape.layers else blocks > 0,
        "checkpointed_blocks": blocks, "layers": shape.layers, "optimizer": optimizer, "device": device, "chunk_tokens": chunk_tokens,
    }
    inputs = dict(model_or_config=shape, quant=quant, lora=lora, batch=batch, seq_len=seq_len,
                  gradient_checkpointing=blocks, optimizer=optimizer, device=device,
                  chunk_tokens=chunk_tokens, dtype=cdtype)
    return MemoryPlan(shape.name, settings, components, shape.parameters(), trainable, notes, inputs, moe)


def _check_settings(shape: ModelShape, lora: LoraConfig, batch: int, seq_len: int, optimizer: str,
                    device: str, chunk_tokens: int) -> None:
    for what, value in (("batch", batch), ("seq_len", seq_len), ("chunk_tokens", chunk_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise QLoraKitError(f"{what}={value!r} must be a positive integer")
    if seq_len < 2:
        raise QLoraKitError(f"seq_len={seq_len}: next-token training needs at least 2 tokens per sequence")
    if lora.r > shape.hidden:
        raise QLoraKitError(f"LoRA rank r={lora.r} is above the model's hidden size {shape.hidden}: a low-rank "
                            "adapter must have r well below it (8-64 is usual)")
    if optimizer not in OPTIMIZERS:
        raise QLoraKitError(f"unknown optimizer {optimizer!r}{closest(optimizer, OPTIMIZERS)}: "
                            f"use one of {', '.join(OPTIMIZERS)}")
