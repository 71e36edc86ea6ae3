"""The run folder on disk: whether a run may start, resume or replace one there.

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

What a checkpoint holds, and how one is written, read back and restored: qlora_kit.checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoints import checkpoints, latest_checkpoint
from .errors import QLoraKitError, first_few
from .io import atomic_write_text, disk_full_as_error, refuse_overlap, swap_in, sweep_stale, tmp_path, unknown_entries
from .models import model_location

RUN_FILE = "run.json"
REF_FILE = "ref_logps.safetensors"  # DPO with train.precompute_ref: the reference log-probabilities
RUN_ENTRIES = (RUN_FILE, "metrics.jsonl", "loss.png", "checkpoints", "adapter", "merged", REF_FILE)


def fingerprint(config) -> dict:
    """What a checkpoint must agree on to be resumed into this run."""
    return {"model": str(config.model.path), "quant": config.quant.__dict__, "r": config.lora.r,
            "targets": config.lora.targets, "rslora": config.lora.rslora,
            **({"init": config.lora.init} if config.lora.init != "default" else {}),
            **({"method": config.train.method} if config.train.method != "sft" else {})}


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
