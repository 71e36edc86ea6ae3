"""The optimisers a run can use: their names, how each is built, and how much state each keeps.

One list of names for the YAML's `train.optimizer`, the planner's `--optimizer` and the trainer.
bitsandbytes' 8-bit optimisers keep fp32 state for tensors smaller than `BNB_MIN_8BIT_SIZE`
(their min_8bit_size), quantise the rest in blocks of 256 with one fp32 absmax per block and state,
and share two 256-entry fp32 code tables.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw")
DEFAULT_OPTIMIZER = "paged_adamw_8bit"
SCHEDULES = ("cosine", "linear", "constant")
BNB_MIN_8BIT_SIZE = 4096
BNB_OPT_BLOCK = 256


def build_optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    # On CPU the paged optimiser falls back to ordinary memory and says so at every first step.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer, kind: str, warmup: int, total: int):
    """Linear warm-up over `warmup` steps, then cosine or linear decay to zero, or constant."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_bytes(param_sizes: list[int], optimizer: str) -> int:
    """Bytes of optimiser state for fp32 parameters of these sizes, after the first step."""
    if optimizer == "adamw":                     # exp_avg + exp_avg_sq fp32, and a fp32 step tensor
        return sum(8 * n + 4 for n in param_sizes)
    if optimizer == "paged_adamw_32bit":
        return sum(8 * n for n in param_sizes)
    total, quantised = 0, False
    for n in param_sizes:
        if n < BNB_MIN_8BIT_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * -(-n // BNB_OPT_BLOCK)
            quantised = True
    return total + (2 * 4 * 256 if quantised else 0)
