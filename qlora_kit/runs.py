"""The run folder on disk: whether a run may start, resume or replace one there, and its checkpoints.

    OUT/run.json               the config and the fingerprint a resume must match; written when training begins
    OUT/metrics.jsonl          one row per optimiser step
    OUT/checkpoints/step-N/    adapter, optimiser, scheduler, loss scale, one RNG state per process
    OUT/adapter/               the final adapter (PEFT layout)
    OUT/loss.png, OUT/merged/  the loss plot; the merged model when output.export is set

What a folder holds decides what may happen to it, before anything is read (`plan_run`):

    missing or empty               a new run starts there
    run.json but no checkpoint     a run that stopped before its first save: a new run starts over it
    run.json and a checkpoint      a run: --resume continues it; --overwrite replaces it, but the new run
                                   is written beside it and swapped in only once it has finished
    anything else                  the user's: never written into

A checkpoint is written only when every tensor in it is finite, and read back whole before any of it
is used: a damaged newest checkpoint is reported and the one before it is used instead.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .adapters import Adapter, save_adapter
from .errors import QLoraKitError, first_few
from .io import (atomic_dir, atomic_write_text, check_free, disk_full_as_error, refuse_overlap, swap_in, sweep_stale,
                 tmp_path, unknown_entries)
from .lora import LoraConfig
from .models import model_location
from .state import load_tree, save_tree

RUN_FILE = "run.json"
RUN_ENTRIES = (RUN_FILE, "metrics.jsonl", "loss.png", "checkpoints", "adapter", "merged")
JSON_MARGIN = 2**20  # trainer_state.json, the trees' JSON skeletons and file-system slack


class DamagedCheckpoint(QLoraKitError):
    """A checkpoint folder whose files cannot all be read back (truncated, missing, non-finite)."""


class NonFiniteCheckpoint(QLoraKitError):
    """A checkpoint that was not written because its tensors hold inf or NaN."""


def fingerprint(config) -> dict:
    """What a checkpoint must agree on to be resumed into this run."""
    return {"model": str(config.model.path), "quant": config.quant.__dict__, "r": config.lora.r,
            "targets": config.lora.targets, "rslora": config.lora.rslora,
            **({"init": config.lora.init} if config.lora.init != "default" else {})}


# ---------------------------------------------------------------- the folder

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


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "fingerprint" in meta else None


def folder_state(folder: Path) -> str:
    """'free', 'unstarted' (run.json, no checkpoint), 'run', or 'foreign' (not ours)."""
    folder = Path(folder)
    if folder.is_file():
        raise QLoraKitError(f"output.dir {folder} is a file: choose a folder for the run")
    if not folder.is_dir() or not unknown_entries(folder, lambda name: False):
        return "free"
    if _read_meta(folder) is None:
        return "foreign"
    return "run" if checkpoints(folder) or (folder / "adapter").is_dir() else "unstarted"


@dataclass
class RunPlan:
    """Where this run writes. `dir` is `final`, except when replacing a run: then a folder beside it."""

    final: Path
    dir: Path
    mode: str  # new | restart | resume | replace

    def next_step(self) -> str:
        """What the user can do after a failure, as the end of a sentence."""
        if self.mode == "replace":
            return f"run again with --overwrite (nothing was replaced: the previous run in {self.final} is as it was)"
        last = latest_checkpoint(self.dir)
        return f"continue from {last.name} with --resume" if last else \
            "start the run again (no checkpoint was written yet)"


def plan_run(config, resume: bool, overwrite: bool) -> RunPlan:
    """Decide what happens to output.dir, or refuse; reads the folder, writes nothing."""
    final = Path(config.output.dir)
    if resume and overwrite:
        raise QLoraKitError(f"--resume continues the run in {final} and --overwrite replaces it: pass only one")
    refuse_overlap(final, {"model folder": model_location(config.model.path)}, "output.dir")
    state = folder_state(final)
    if state == "foreign":
        raise QLoraKitError(f"output folder {final} is not empty and holds no qlora_kit run: choose another output.dir "
                            "(--overwrite replaces only a run folder qlora_kit wrote)")
    if resume:
        if not checkpoints(final):
            what = "holds no run" if state == "free" else (
                "has no checkpoint: the run stopped before its first save (every train.save_every = "
                f"{config.train.save_every} steps)")
            raise QLoraKitError(f"nothing to resume: {final} {what}; start the run without --resume")
        old = _read_meta(final)["fingerprint"]
        if old != fingerprint(config):
            raise QLoraKitError(f"cannot resume {final}: it was trained with model/LoRA settings {old}, this config "
                                f"has {fingerprint(config)}")
        return RunPlan(final, final, "resume")
    if state == "run":
        if not overwrite:
            raise QLoraKitError(f"output folder {final} already holds a run: pass --resume to continue it, or "
                                "--overwrite to replace it (the new run is written beside it and replaces it only "
                                "when it finishes)")
        strangers = unknown_entries(final, RUN_ENTRIES.__contains__)
        if strangers:
            raise QLoraKitError(f"output folder {final} holds files qlora_kit did not write ({first_few(strangers)}), "
                                "which --overwrite would delete: move them out of the run folder, or choose another "
                                "output.dir")
        return RunPlan(final, tmp_path(final), "replace")
    return RunPlan(final, final, "restart" if state == "unstarted" else "new")


def begin_run(plan: RunPlan, config, say: Callable[[str], None] = print) -> None:
    """Training begins: clear what killed runs left, create the folder, write run.json."""
    sweep_stale(plan.final.parent, plan.final.name, say)  # a killed --overwrite run's folder
    if plan.mode == "replace":
        say(f"qlora-kit: the new run is written to {plan.dir} and replaces the run in {plan.final} when it finishes")
    else:
        sweep_stale(plan.final, None, say)
        sweep_stale(plan.final / "checkpoints", None, say)
    if plan.mode == "restart":
        say(f"qlora-kit: {plan.final} holds a run that stopped before its first checkpoint; starting it again")
        for name in ("metrics.jsonl", "loss.png"):
            (plan.final / name).unlink(missing_ok=True)
    text = json.dumps({"config": config.to_dict(), "fingerprint": fingerprint(config)}, indent=2)
    with disk_full_as_error(plan.dir.parent, len(text), RUN_FILE, "free some space and start the run again"):
        plan.dir.mkdir(parents=True, exist_ok=True)
        if plan.mode != "resume":
            atomic_write_text(plan.dir / RUN_FILE, text)


@contextlib.contextmanager
def run_folder(plan: RunPlan, config, main: bool, say: Callable[[str], None] = print):
    """Begin the run on entry; on success put a replacing run in place of the old one, on failure
    discard it (the old one stays as it was). Only the main process touches the folder."""
    if main:
        begin_run(plan, config, say)
    try:
        yield plan.dir
    except BaseException:
        if main and plan.mode == "replace":
            shutil.rmtree(plan.dir, ignore_errors=True)
        raise
    if main and plan.mode == "replace":
        swap_in(plan.dir, plan.final)
        say(f"qlora-kit: the new run replaced the previous one in {plan.final}")


# ---------------------------------------------------------------- checkpoints

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


@dataclass
class Checkpoint:
    """Everything in one checkpoint folder, read and checked, nothing applied yet."""

    path: Path
    step: int
    state: dict                       # trainer_state.json: scheduler, loss scale, world
    lora: LoraConfig
    adapter: dict[str, torch.Tensor]
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
        record = Adapter.read(ckpt / "adapter")
        lora, adapter = record.lora, record.tensors
    except QLoraKitError as e:
        raise DamagedCheckpoint(f"checkpoint {ckpt} is damaged ({e})") from None
    try:
        optimizer = load_tree(ckpt, "optimizer")
        rng = [load_tree(ckpt, f"rng-{r}") for r in range(world)]
    except QLoraKitError as e:
        raise DamagedCheckpoint(str(e)) from None
    bad = non_finite({"adapter": adapter, "optimiser state": optimizer})
    if bad:
        raise DamagedCheckpoint(f"checkpoint {ckpt} is damaged ({bad} holds non-finite values)")
    return Checkpoint(ckpt, step, state, lora, adapter, optimizer, rng)


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
