"""Checkpoints: writing one, reading one back whole, choosing the newest readable, restoring a run from it.

    checkpoints/step-N/adapter/                  the adapter (PEFT layout, fp32)
    checkpoints/step-N/optimizer.{safetensors,json}
    checkpoints/step-N/trainer_state.json        step, number of processes, scheduler, fp16 loss scale
    checkpoints/step-N/rng-R.{safetensors,json}  the RNG state of process R

A checkpoint is written only when every tensor in it is finite, into a temporary folder renamed into
place (a kill leaves the previous one as it was), and read back whole before any of it is used: a
damaged newest checkpoint is reported and the one before it is used instead. Resuming restores the
adapter, optimiser, scheduler, loss scale and every process's RNG, so that together with a data order
that depends only on (seed, epoch) a resumed run ends with the adapter an uninterrupted one ends with.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .adapters import Adapter, layer_shapes, save_adapter
from .errors import QLoraKitError
from .fsdp import load_lora_state, load_optimizer_state
from .io import atomic_dir, check_free, disk_full_as_error
from .losses import LossScaler
from .record import record_of
from .state import load_tree, save_tree

JSON_MARGIN = 2**20  # trainer_state.json, the trees' JSON skeletons and file-system slack


class DamagedCheckpoint(QLoraKitError):
    """A checkpoint folder whose files cannot all be read back (truncated, missing, non-finite)."""


class NonFiniteCheckpoint(QLoraKitError):
    """A checkpoint that was not written because its tensors hold inf or NaN."""


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoints/step-N folders, oldest first."""
    found = []
    for p in (Path(run_dir) / "checkpoints").glob("step-*"):
        if p.name[5:].isdigit() and p.is_dir():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------- RNG

def rng_state() -> dict:
    """This process's torch, Python and (where present) CUDA random states."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- writing

def _tensors(tree, where: str = ""):
    """(path, tensor) for every tensor in a nested structure of dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        yield where, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{where}.{k}" if where else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{where}[{i}]")


def non_finite(trees: dict) -> str | None:
    """'adapter (model.layers.0...lora_B.weight)' for the first tensor holding inf/NaN, else None."""
    for name, tree in trees.items():
        for where, t in _tensors(tree):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"the {name} ({where})"
    return None


def trainer_state(scheduler, scaler: LossScaler) -> dict:
    """What trainer_state.json holds besides the step: the scheduler, and the loss scale where there is one."""
    return {"scheduler": scheduler.state_dict(), **({"loss_scale": scaler.state_dict()} if scaler.enabled else {})}


def save_checkpoint(run_dir: Path, step: int, model, adapter: dict, optim_state: dict, trainer_state: dict,
                    keep_last: int, rng_states: list[dict], advice: str | Callable[[], str] = "") -> Path:
    """Write checkpoints/step-N atomically (adapter, optimiser, trainer state, one RNG state per process),
    then keep the newest `keep_last`. Refuses tensors that are not finite: a checkpoint is always good."""
    out = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    bad = non_finite({"adapter": adapter, "optimiser state": optim_state})
    if bad:
        raise NonFiniteCheckpoint(f"checkpoint {out.name} was not written: {bad} holds non-finite values")
    needed = sum(t.numel() * t.element_size() for tree in (adapter, optim_state, rng_states)
                 for _, t in _tensors(tree)) + JSON_MARGIN
    what = f"checkpoint {out.name}"
    check_free(out.parent, needed, what, advice() if callable(advice) else advice)
    with disk_full_as_error(out.parent, needed, what, advice), atomic_dir(out, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter", tensors=adapter)
        save_tree(optim_state, tmp, "optimizer")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world": len(rng_states), **trainer_state}))
        for rank, rng in enumerate(rng_states):
            save_tree(rng, tmp, f"rng-{rank}")
    for old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return out


# ---------------------------------------------------------------- reading

@dataclass
class Checkpoint:
    """Everything in one checkpoint folder, read and checked, nothing applied yet."""

    path: Path
    step: int
    state: dict                       # trainer_state.json: scheduler, loss scale, world
    adapter: Adapter
    optimizer: dict
    rng: list[dict]                   # one per process


def read_checkpoint(ckpt: Path, world: int) -> Checkpoint:
    """Read every file of a checkpoint; DamagedCheckpoint when any is missing, truncated or not finite."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step = int(state["step"])
        state["scheduler"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"checkpoint {ckpt} is damaged (trainer_state.json: "
                                f"{' '.join(str(e).split()) or type(e).__name__})") from None
    if state.get("world", 1) != world:
        raise QLoraKitError(f"checkpoint {ckpt} was written by {state.get('world')} processes; resume it with "
                            f"the same number (this run has {world})")
    try:
        adapter = Adapter.read(ckpt / "adapter")
    except QLoraKitError as e:
        raise DamagedCheckpoint(f"checkpoint {ckpt} is damaged ({e})") from None
    try:
        optimizer = load_tree(ckpt, "optimizer")
        rng = [load_tree(ckpt, f"rng-{r}") for r in range(world)]
    except QLoraKitError as e:
        raise DamagedCheckpoint(str(e)) from None
    bad = non_finite({"adapter": adapter.tensors, "optimiser state": optimizer})
    if bad:
        raise DamagedCheckpoint(f"checkpoint {ckpt} is damaged ({bad} holds non-finite values)")
    return Checkpoint(ckpt, step, state, adapter, optimizer, rng)


def newest_readable(run_dir: Path, world: int, say: Callable[[str], None] = print) -> Checkpoint:
    """The newest checkpoint that reads back whole; each damaged newer one is reported and skipped."""
    damaged = []
    for ckpt in reversed(checkpoints(run_dir)):
        try:
            found = read_checkpoint(ckpt, world)
        except DamagedCheckpoint as e:
            damaged.append(str(e))
            say(f"qlora-kit: {e}; trying the checkpoint before it")
            continue
        if damaged:
            say(f"qlora-kit: resuming from {ckpt.name}, the newest checkpoint that reads back whole")
        return found
    if not damaged:
        raise QLoraKitError(f"nothing to resume: {run_dir} has no checkpoint; start the run without --resume")
    raise QLoraKitError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} can be read back ({damaged[0]}): the run "
                        "cannot be resumed; start it again with --overwrite")


# ---------------------------------------------------------------- restoring

def restore_checkpoint(ckpt: Checkpoint, model: nn.Module, optimizer, scheduler, rank: int, sharded: bool,
                       scaler: LossScaler | None = None) -> int:
    """Put a checkpoint's state into this run's model, optimiser, scheduler, loss scale and RNG; its step."""
    ckpt.adapter.check_fits(layer_shapes(model), "this run's model", rank=record_of(model).lora.r, every=True)
    load_lora_state(model, ckpt.adapter.tensors)
    load_optimizer_state(optimizer, ckpt.optimizer, sharded)
    scheduler.load_state_dict(ckpt.state["scheduler"])
    if scaler is not None and scaler.enabled:
        scaler.load_state_dict(ckpt.state.get("loss_scale"), ckpt.path)
    set_rng_state(ckpt.rng[rank])
    return ckpt.step
