"""Sharded data parallelism (FSDP2) for QLoRA: each process keeps 1/N of the 4-bit weights.

With plain data parallelism every process holds the whole quantised model. Under FSDP each decoder
block's parameters, including every QuantLinear's packed 4-bit weight (a frozen uint8 parameter),
are split across processes and gathered just before the block runs, forward and backward, then
freed again. The quantisation constants (absmax, a few percent of the bytes) stay replicated, and
so do the embeddings, final norm and output head: they are frozen (nothing to synchronise) and the
chunked loss calls the decoder body and the head separately, outside any root module's forward.
Sharding the blocks is what lets a 70B model train on two 24 GB cards.

Launch as usual (`accelerate launch` on GPUs, `torchrun` on CPUs) with `train.fsdp: true`.
Checkpoints hold full (unsharded) adapter and optimiser tensors, so a run can be resumed.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import lora_state_dict
from .modeltree import decoder_layers
from .quant import QuantLinear


def shard_model(model: nn.Module) -> nn.Module:
    """fully_shard every decoder block (each its own FSDP unit; the rest stays replicated)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    return model


def local_packed_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of packed 4/8-bit weights this process holds, bytes of the whole model's)."""
    local = full = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            w = m.weight
            part = w.to_local() if hasattr(w, "to_local") else w
            local += part.numel() * part.element_size()
            full += w.numel() * w.element_size()
    return local, full


def full_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors gathered to full size on every process (a collective: all ranks must call)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in lora_state_dict(model).items()}


def optimizer_state(optimizer, sharded: bool) -> dict:
    """The optimiser's state dict with full tensors (a collective when sharded: all ranks must call)."""
    state = optimizer.state_dict()
    if sharded:
        state["state"] = {i: {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in s.items()}
                          for i, s in state["state"].items()}
    return state


def load_optimizer_state(optimizer, state: dict, sharded: bool) -> None:
    """Load a full optimiser state, cutting each tensor to this process's shard when sharded."""
    if sharded:
        from torch.distributed.tensor import distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, entry in state["state"].items():
            p = params[i]
            for k, v in entry.items():
                if isinstance(v, torch.Tensor) and hasattr(p, "device_mesh") and v.shape == p.shape:
                    entry[k] = distribute_tensor(v, p.device_mesh, p.placements)
    optimizer.load_state_dict(state)


def load_lora_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full adapter tensors into the model, into each process's shard when sharded."""
    current = lora_state_dict(model)
    with torch.no_grad():
        for k, t in tensors.items():
            p = current[k]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(t)
