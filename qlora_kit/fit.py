"""Will a plan fit: the memory of the usual cards, the memory free on this device now, and which
card fits which model.

Owns the card tables (GPUS for `qlora-kit plan`'s verdicts, COLAB_GPUS for the notebooks),
free_memory and check_fits (the trainer's warning before it loads), the memory budget and the
fewest checkpointed blocks that fit it (the trainer's `gradient_checkpointing: auto`), and
fit_table (the notebooks' table). The plan itself comes from qlora_kit.plan.
"""

from __future__ import annotations

import re

import torch

from .errors import QLoraKitError
from .plan import COMPONENTS, GiB, MemoryPlan, MiB, plan_memory

# The share of the host's available RAM a CPU run may plan for when no budget is given: the rest is
# left to the system and whatever else the machine runs (a laptop's browser, the data loader).
CPU_BUDGET_SHARE = 0.5
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": MiB, "gib": GiB, "tib": 1024 ** 4}


# Usable memory as the cards report it (nvidia-smi totals), for the verdict table.
GPUS = {
    "RTX 3060 12GB": 12288 * MiB,
    "T4 16GB": 15360 * MiB,
    "RTX 3090/4090 24GB": 24576 * MiB,
    "A100 40GB": 40960 * MiB,
    "A100 80GB": 81920 * MiB,
    "H100 80GB": 81559 * MiB,
}

# Colab's GPUs, usable memory as nvidia-smi reports it, for the notebooks' table.
COLAB_GPUS = {
    "T4 16GB (free)": 15360 * MiB,
    "L4 24GB": 23034 * MiB,
    "A100 40GB": 40960 * MiB,
}


# ---------------------------------------------------------------------------------------------
# Before loading: the trainer's warning


def free_memory(device: str | torch.device) -> int:
    """Bytes free on the device now: the GPU's free memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(plan: MemoryPlan, device: str | torch.device = "cuda", free_bytes: int | None = None) -> str | None:
    """A warning to print before loading when the plan exceeds the device's free memory, else None."""
    free = free_memory(device) if free_bytes is None else free_bytes
    if plan.total <= free:
        return None
    c = plan.components
    biggest = max(("activations", "logits_loss", "optimizer_state"), key=lambda k: c[k])
    return (f"this run is planned to need {plan.total / GiB:.1f} GiB but {torch.device(device)} has "
            f"{free / GiB:.1f} GiB free; it will likely run out of memory. The largest part that settings "
            f"change is {COMPONENTS[biggest]} ({c[biggest] / GiB:.1f} GiB): lower batch or seq_len, keep "
            "gradient checkpointing on, or use a paged 8-bit optimiser")


# ---------------------------------------------------------------------------------------------
# The budget, and how many blocks to recompute for it


def parse_budget(value: int | float | str) -> int:
    """Bytes from a budget as a user writes it: 12884901888, "12GiB", "12 GB", "800MiB"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise QLoraKitError(f"memory budget {value!r}: write a positive size such as 12GiB, 16GB or 800MiB "
                            "(or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def default_budget(device: str | torch.device) -> tuple[int, str]:
    """(bytes, where they come from) when the user names no budget: a GPU's free memory, or a share of
    the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return free_memory(device), f"the free memory of {device}"
    return int(CPU_BUDGET_SHARE * free_memory(device)), f"{CPU_BUDGET_SHARE:.0%} of the available RAM"


def fewest_checkpointed_blocks(plan: MemoryPlan, budget_bytes: int) -> MemoryPlan:
    """The plan with the fewest decoder blocks checkpointed (each one checkpointed runs its forward
    pass twice) whose peak fits `budget_bytes`; every block checkpointed when none fits."""
    layers = plan.settings["layers"]
    for blocks in range(layers + 1):
        candidate = plan.with_settings(gradient_checkpointing=blocks)
        if candidate.fits(budget_bytes):
            return candidate
    return plan.with_settings(gradient_checkpointing=layers)


# ---------------------------------------------------------------------------------------------
# Which GPU fits which model (the notebooks' Colab note)


def fit_table(models: list[str], gpus: dict[str, int] | None = None, seq_len: int = 1024, **settings) -> str:
    """A text table: per model, the plan's total at batch 1 and the largest batch of `seq_len`-token
    sequences that fits each GPU ('-' where not even one does). `settings` go to plan_memory."""
    gpus = COLAB_GPUS if gpus is None else gpus
    rows = [["model", "params", f"1 x {seq_len}", *gpus]]
    for model in models:
        plan = plan_memory(model, seq_len=seq_len, **settings)
        batches = [plan.max_batch_seq(size, (seq_len,))[seq_len] for size in gpus.values()]
        rows.append([plan.model, f"{plan.parameters / 1e9:.1f}B", f"{plan.total / GiB:.1f} GiB",
                     *(f"batch {b}" if b else "-" for b in batches)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
