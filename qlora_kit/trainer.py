"""The training loop: one config in, a trained adapter (and optionally a merged model) out.

    run = train("run.yaml")            # or train(RunConfig(...)), or `qlora-kit train run.yaml`

A run folder holds run.json (the config), metrics.jsonl, loss.png, checkpoints/step-N/ (adapter,
optimiser, scheduler, RNG and data position, each written atomically; the last `keep_last` kept)
and adapter/ (the final adapter, PEFT layout); qlora_kit.runs says when one may be started, resumed
or replaced, and qlora_kit.checkpoints writes, reads and restores the checkpoints. Nothing is written
until training begins. `resume=True` continues from the newest checkpoint and ends with the same
adapter as an uninterrupted run: the data order depends only on (seed, epoch), and every random
state is restored. `overwrite=True` trains beside the old run and replaces it only when the new one
has finished.

`train` runs in phases, each a function below, in this order: setup (config, processes, what happens
to output.dir), data (read and split the files, tokenise them once the tokenizer is loaded), model
(load, adapters, gradient checkpointing, sharding, optimiser, scheduler, loss scaler), resume (a
checkpoint's state, or the seed), loop (steps, metrics, evals, checkpoints) and finish (final
adapter, loss plot, optional export).

Data-parallel runs go through accelerate (`accelerate launch`, or `torchrun` on CPU): each process
takes every world-th micro-batch, and gradients are averaged across processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .adapt import add_lora, trainable_parameters
from .adapters import save_adapter
from .checkpoints import (NonFiniteCheckpoint, latest_checkpoint, newest_readable, restore_checkpoint, rng_state,
                          save_checkpoint, trainer_state)
from .config import RunConfig, config_from_dict, load_config
from .data import DataStats, Dataset, build_dataset, collate, microbatches, prepare_tokenizer, read_jsonl, split
from .errors import QLoraKitError
from .export import export_merged
from .fit import check_fits, default_budget, fewest_checkpointed_blocks, parse_budget
from .fsdp import full_lora_state, local_packed_bytes, optimizer_state, shard_model
from .io import atomic_file, atomic_write_bytes, atomic_write_text, disk_full_as_error
from .loading import load_model, set_gradient_checkpointing
from .losses import LossScaler, causal_lm_loss, sequence_logps
from .memory import release_freed_memory
from .modeltree import decoder_layers
from .models import resolve_model_path
from .optim import build_optimizer, build_scheduler
from .plan import GiB, plan_memory
from .preference import PairExample, PreferenceLoss, build_pairs, collate_pairs, pair_messages
from .runs import REF_FILE, RunPlan, plan_run, run_folder
from .tensorfiles import read_tensors

if TYPE_CHECKING:
    from accelerate import Accelerator


_STEP_DELAY = float(os.environ.get("QLORA_KIT_STEP_DELAY", "0") or 0)
MAX_SKIPPED_IN_A_ROW = 25  # fp16: from the initial scale 2^16 this is a scale below 2^-9, far past any overflow


class LossModule(nn.Module):
    """Model + chunked loss as one module, so a data-parallel wrapper sees the whole forward."""

    def __init__(self, model: nn.Module, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        return causal_lm_loss(self.model, input_ids, labels, attention_mask, self.chunk_tokens, position_ids)


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    eval_before: float | None
    eval_after: float | None
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass
class Run:
    """What every phase reads: the validated config, the processes, and where the run writes."""

    config: RunConfig
    accelerator: Accelerator
    plan: RunPlan
    progress: bool
    started: float

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        """Print once per run, not once per process."""
        if self.main:
            print(text)


@dataclass
class Data:
    """The tokenised datasets, and what reading the files counted."""

    train: Dataset
    eval: Dataset | None
    pad_id: int
    stats: DataStats
    pack_to: int | None = None        # SFT batches share rows of this many tokens when that saves work


@dataclass
class Learner:
    """The model and what trains it, as the model phase built them."""

    base: Path                        # the base model's folder
    model: nn.Module
    loss_module: nn.Module            # what the forward and backward passes go through
    params: list[nn.Parameter]        # the trainable ones, as the optimiser holds them (sharded ones when sharded)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: LossScaler
    sharded: bool
    total_steps: int
    per_step: int                     # sequences per optimiser step, all processes together
    trainable: int                    # parameter counts before sharding
    total_params: int


def train(config: RunConfig | dict | str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True,
          export: bool | None = None) -> TrainResult:
    """Fine-tune with LoRA on a quantised base as `config` says (a RunConfig, a YAML file, or a dict
    with the YAML's sections); see the module docstring."""
    run = _setup(config, resume, overwrite, progress)
    train_records, eval_records, stats = _read_data(run)
    base, model, tokenizer, checkpointing = _load_model(run)
    data = _tokenise(run, train_records, eval_records, stats, tokenizer)  # with the model's own tokenizer
    learner = _prepare_model(run, base, model, data, checkpointing)
    start_step = _resume_or_seed(run, learner)
    run.say(_summary(data, learner, start_step))
    with run_folder(run.plan, run.config, run.main, run.say):
        run.accelerator.wait_for_everyone()  # the main process has just created the folder
        history, eval_before, eval_after = _loop(run, data, learner, start_step)
        _save_final(run, learner, history)
    return _finish(run, learner, history, eval_before, eval_after, export)


# ---------------------------------------------------------------- setup

def _setup(config: RunConfig | dict | str | Path, resume: bool, overwrite: bool, progress: bool) -> Run:
    """The validated config, the processes, and what happens to output.dir."""
    from accelerate import Accelerator

    if isinstance(config, dict):
        config = config_from_dict(config)
    config = load_config(config) if isinstance(config, (str, Path)) else config.validate()
    t = config.train
    cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu)
    # What happens to output.dir is settled before anything is read, and nothing is written there
    # until training begins: a bad data file or model costs no run folder.
    plan = _decided_on_main(accelerator, lambda: plan_run(config, resume, overwrite))
    return Run(config, accelerator, plan, progress, time.time())


def _decided_on_main(accelerator, decide):
    """Run `decide()` on the main process and give every process its result (or its error)."""
    if accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    box = [None]
    if accelerator.is_main_process:
        try:
            box = [decide()]
        except QLoraKitError as e:
            box = [e]
    broadcast_object_list(box)
    if isinstance(box[0], QLoraKitError):
        raise box[0]
    return box[0]


# ---------------------------------------------------------------- data

def _read_data(run: Run) -> tuple[list[dict], list[dict], DataStats]:
    """Training and held-out records; read before the model loads, so a bad data file fails fast."""
    d, t = run.config.data, run.config.train
    stats = DataStats()
    check = pair_messages if t.method != "sft" else None  # dpo / orpo read preference pairs
    records = read_jsonl(d.train, d.on_bad_line, stats, check)[: d.max_examples]
    if d.eval:
        return records, read_jsonl(d.eval, d.on_bad_line, stats, check), stats
    train_records, eval_records = split(records, d.eval_fraction, t.seed)
    return train_records, eval_records, stats


def _tokenise(run: Run, train_records: list[dict], eval_records: list[dict], stats: DataStats, tokenizer) -> Data:
    """The records as token ids and loss masks (SFT batches packed when data.packing says so)."""
    d = run.config.data
    if run.config.train.method != "sft":  # a Dataset of PairExample: each example a (chosen, rejected) pair
        train_set = Dataset(build_pairs(train_records, tokenizer, d.max_seq_len, stats), stats)
        eval_set = Dataset(build_pairs(eval_records, tokenizer, d.max_seq_len), DataStats()) if eval_records else None
        return Data(train_set, eval_set, tokenizer.pad_token_id, stats)
    train_set = build_dataset(train_records, tokenizer, d.max_seq_len, stats)
    eval_set = build_dataset(eval_records, tokenizer, d.max_seq_len) if eval_records else None
    return Data(train_set, eval_set, tokenizer.pad_token_id, stats, d.max_seq_len if d.packing else None)


# ---------------------------------------------------------------- model

def _load_model(run: Run) -> tuple[Path, nn.Module, object, bool | int]:
    """(base folder, quantised model, prepared tokenizer, how many blocks to checkpoint), after the
    memory plan is printed."""
    config = run.config
    base = resolve_model_path(config.model.path)
    # every process checkpoints the same blocks: the main one's plan decides (its budget, its print)
    checkpointing = _decided_on_main(run.accelerator, lambda: announce_plan(base, config, run.accelerator.device))
    model, tokenizer = load_model(base, quant=config.quant.build(), device=run.accelerator.device,
                                  trust_remote_code=config.model.trust_remote_code, progress=run.progress and run.main)
    return base, model, prepare_tokenizer(tokenizer), checkpointing


def announce_plan(model_path: Path, config: RunConfig, device: torch.device) -> bool | int:
    """Print the memory plan in one line, warn before loading if it will not fit, and settle the
    gradient checkpointing: train.gradient_checkpointing as given, or with 'auto' the fewest
    checkpointed blocks (the fastest step) whose plan fits train.memory_budget, else the device's
    default budget (qlora_kit.fit.default_budget)."""
    t = config.train
    auto = t.gradient_checkpointing == "auto"
    try:
        # a preference batch holds both responses of each pair: twice the sequences
        plan = plan_memory(model_path, config.quant.build(), config.lora.build(t.seed),
                           batch=t.batch_size * (1 if t.method == "sft" else 2),
                           seq_len=config.data.max_seq_len, gradient_checkpointing=True if auto else t.gradient_checkpointing,
                           optimizer=t.optimizer, device=device.type, chunk_tokens=t.loss_chunk_tokens)
    except QLoraKitError as e:  # a model family the planner does not know must not stop training
        print(f"qlora-kit: no memory plan ({e}){'; checkpointing every block' if auto else ''}")
        return True if auto else t.gradient_checkpointing
    choice = ""
    if auto:
        if t.memory_budget is not None:
            budget, source = parse_budget(t.memory_budget), "train.memory_budget"
        else:
            budget, source = default_budget(device)
        plan = fewest_checkpointed_blocks(plan, budget)
        k, layers = plan.settings["checkpointed_blocks"], plan.settings["layers"]
        fits = plan.fits(budget)
        choice = (f"; checkpointing {k} of {layers} blocks, the fewest that fit {budget / GiB:.2f} GiB ({source})"
                  if fits else f"; checkpointing every block, and even so it needs more than {budget / GiB:.2f} GiB "
                  f"({source})")
    print(f"qlora-kit: {plan.summary()}{choice}")
    warning = check_fits(plan, device)
    if warning:
        warnings.warn(warning, stacklevel=2)
    return plan.settings["checkpointed_blocks"] if auto else t.gradient_checkpointing


def _prepare_model(run: Run, base: Path, model: nn.Module, data: Data, checkpointing: bool | int) -> Learner:
    """Adapters, gradient checkpointing, sharding or data-parallel wrapping, optimiser, scheduler, loss scaler."""
    t, accelerator = run.config.train, run.accelerator
    world = accelerator.num_processes
    add_lora(model, run.config.lora.build(t.seed))
    set_gradient_checkpointing(model, checkpointing)
    trainable, total_params = trainable_parameters(model)

    per_step = t.batch_size * t.grad_accum * world
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(data.train) / per_step))
    sharded = t.fsdp and world > 1

    def loss_of(model: nn.Module) -> nn.Module:
        if t.method == "sft":
            return LossModule(model, t.loss_chunk_tokens)
        return PreferenceLoss(model, t.method, t.beta, t.loss_type, t.loss_chunk_tokens)

    if sharded:  # FSDP2: each process keeps 1/world of every block's weights, packed 4-bit ones included
        shard_model(model)
        loss_module = loss_of(model)
        local, full = local_packed_bytes(model)
        run.say(f"qlora-kit: fsdp over {world} processes: this process holds {local:,} of {full:,} bytes "
                "of packed 4/8-bit weights")
    else:
        loss_module = accelerator.prepare(loss_of(model))
    # After sharding: FSDP replaces each parameter by a sharded one, and the optimiser must hold those.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    scheduler = build_scheduler(optimizer, t.schedule, t.warmup_steps, total_steps)
    compute_dtype = model.get_input_embeddings().weight.dtype  # the loader's resolved compute dtype
    if sharded and compute_dtype == torch.float16:
        raise QLoraKitError("fp16 compute with fsdp: true is not supported (its loss scaling would have to see "
                            "every shard); set quant.compute_dtype: bf16 (or fp32), or train without fsdp")
    scaler = LossScaler(compute_dtype == torch.float16, accelerator.device)
    if scaler.enabled:  # a skipped first step is expected, and the schedule follows steps, not updates
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    return Learner(base, model, loss_module, params, optimizer, scheduler, scaler, sharded, total_steps, per_step,
                   trainable, total_params)


# ---------------------------------------------------------------- resume

def _resume_or_seed(run: Run, learner: Learner) -> int:
    """The step training continues after: a resumed run's (its checkpoint restored), else 0 (the seed set)."""
    rank = run.accelerator.process_index
    if run.plan.mode == "resume":
        ckpt = newest_readable(run.plan.dir, run.accelerator.num_processes, run.say)
        return restore_checkpoint(ckpt, learner.model, learner.optimizer, learner.scheduler, rank, learner.sharded,
                                  learner.scaler)
    torch.manual_seed(run.config.train.seed + rank)  # dropout masks differ per process, reproducibly
    return 0


def _summary(data: Data, learner: Learner, start_step: int) -> str:
    trainable, total = learner.trainable, learner.total_params
    return (f"qlora-kit: {learner.base.name}, {trainable:,} trainable of {total:,} params "
            f"({100 * trainable / total:.2f}%); data: {data.stats.summary()}; {learner.total_steps} steps of "
            f"{learner.per_step} {'sequences' if isinstance(data.train.examples[0], tuple) else 'pairs'}"
            + (f"; resuming at step {start_step}" if start_step else ""))


# ---------------------------------------------------------------- loop

def _loop(run: Run, data: Data, learner: Learner, start_step: int) -> tuple[list[dict], float | None, float | None]:
    """The optimiser steps from start_step + 1 to total_steps, with metrics, evals and checkpoints:
    (the metrics rows, the held-out loss before training (a new run) and the last one measured)."""
    t, accelerator, scaler = run.config.train, run.accelerator, learner.scaler
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    history = _read_history(run.plan.dir / "metrics.jsonl", upto=start_step) \
        if run.main and run.plan.mode == "resume" else []
    eval_before = eval_after = None
    if t.precompute_ref:
        _reference_cache(run, data, learner, start_step)
    if data.eval is not None and start_step == 0:
        measured = _evaluate(run, data, learner)
        eval_before = measured["eval_loss"]
        history.append({"step": 0, **measured})
    batches = microbatches(data.train, t.batch_size, t.seed, start_step * t.grad_accum * world, rank, world)
    with tqdm(total=learner.total_steps, initial=start_step, desc="training", unit="step",
              disable=not (run.progress and run.main)) as bar:
        learner.loss_module.train()
        for step in range(start_step + 1, learner.total_steps + 1):
            tick = time.time()
            step_loss, tokens, taken, metrics = _step(run, data, learner, batches, step)
            elapsed = time.time() - tick
            row = {"step": step, "loss": step_loss, "lr": learner.scheduler.get_last_lr()[0],
                   "tokens_per_s": tokens * world / elapsed, "mem_mb": memory_mb(device), **metrics}
            if scaler.enabled:
                row.update(skipped=not taken, loss_scale=scaler.scale_value, skipped_steps=scaler.skipped)
            if data.eval is not None and (step % t.eval_every == 0 or step == learner.total_steps):
                row.update(_evaluate(run, data, learner))
                eval_after = row["eval_loss"]
            history.append(row)
            if run.main:
                _append_row(run.plan, row)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}",
                            mem=f"{row['mem_mb']:.0f}MB", **({"skipped": scaler.skipped} if scaler.enabled else {}))
            bar.update(1)
            if _STEP_DELAY:
                time.sleep(_STEP_DELAY)  # lets tests kill a run between checkpoints
            if step % t.save_every == 0 or step == learner.total_steps:
                _checkpoint(run, learner, step)
    if scaler.enabled and run.main:
        print(f"qlora-kit: fp16 loss scaling skipped {scaler.skipped} of {learner.total_steps} steps (overflow); "
              f"final scale {scaler.scale_value:g}")
    return history, eval_before, eval_before if eval_after is None else eval_after


def _step(run: Run, data: Data, learner: Learner, batches, step: int) -> tuple[float, int, bool, dict]:
    """One optimiser step over grad_accum micro-batches: (its loss, averaged over the processes; this
    process's tokens; whether the step was taken; a preference loss's metrics, averaged likewise).
    Stops the run when the loss or the weights diverge."""
    t, accelerator, scaler = run.config.train, run.accelerator, learner.scaler
    tokens, losses, stats = 0, [], []
    for micro in range(t.grad_accum):
        _, examples = next(batches)
        batch = {k: v.to(accelerator.device) for k, v in _collate(data, examples).items()}
        sync = micro == t.grad_accum - 1
        if learner.sharded:
            for layer in decoder_layers(learner.model):
                layer.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if sync or learner.sharded else accelerator.no_sync(learner.loss_module):
            loss, _, *extra = learner.loss_module(**batch)
            accelerator.backward(scaler.scale(loss / t.grad_accum))
        losses.append(loss.detach())
        stats += extra
        tokens += real_tokens(examples)
    step_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
    metrics = {k: accelerator.reduce(torch.stack([s[k] for s in stats]).mean(), reduction="mean").item()
               for k in (stats[0] if stats else {})}
    if not math.isfinite(step_loss) and not scaler.enabled:  # fp16: an overflow, the scaler skips the step
        _diverged(run.plan, f"the loss became {step_loss} at step {step}; training stopped before the optimiser "
                            "step")
    scaler.unscale(learner.optimizer)
    if t.max_grad_norm:
        accelerator.clip_grad_norm_(learner.params, t.max_grad_norm)
    taken = scaler.step(learner.optimizer)
    learner.scheduler.step()
    learner.optimizer.zero_grad(set_to_none=True)
    release_freed_memory(accelerator.device)  # the step's freed tensors: reused within it, returned between steps
    if scaler.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        _diverged(run.plan, f"{scaler.skipped_in_a_row} fp16 steps in a row overflowed (loss {step_loss} at "
                            f"step {step}, loss scale now {scaler.scale_value:g}): lowering the scale no longer "
                            "helps, so the model itself has diverged or fp16 cannot hold its activations. Use "
                            "quant.compute_dtype: bf16 or fp32 if the hardware has it")
    if taken and not _all_finite(learner.params, accelerator):
        _diverged(run.plan, f"the adapter weights became non-finite at step {step} (loss {step_loss})")
    return step_loss, tokens, taken, metrics


def _collate(data: Data, examples: list) -> dict[str, torch.Tensor]:
    if isinstance(examples[0], PairExample):
        return collate_pairs(examples, data.pad_id)
    return collate(examples, data.pad_id, data.pack_to)


def real_tokens(examples: list) -> int:
    """The tokens of a micro-batch's examples, padding left out (what tokens/s counts)."""
    if examples and isinstance(examples[0], PairExample):
        return sum(len(p.chosen[0]) + len(p.rejected[0]) for p in examples)
    return sum(len(ids) for ids, _ in examples)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def evaluate(loss_module: nn.Module, dataset, batch_size: int, pad_id: int, device, accelerator,
             pack_to: int | None = None) -> float:
    """Token-weighted mean loss over the whole held-out set (all processes together).

    Every process runs the same number of forward passes (a sharded model gathers weights in each
    one, collectively): a process whose share runs out repeats a batch with weight zero."""
    rank, world = accelerator.process_index, accelerator.num_processes
    rounds = -(-len(dataset) // (batch_size * world))
    was_training = loss_module.training
    loss_module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(rounds):
            start = (i * world + rank) * batch_size
            chunk = dataset.examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk or dataset.examples[:1], pad_id, pack_to).items()}
            loss, n = loss_module(**batch)
            if chunk:
                total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
    total = accelerator.reduce(total, reduction="sum")
    loss_module.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def _evaluate(run: Run, data: Data, learner: Learner) -> dict:
    """The held-out entries of a metrics row: eval_loss and eval_ppl (SFT), or eval_loss and the
    preference metrics as eval_rewards/margins, ... (DPO, ORPO)."""
    t, accelerator = run.config.train, run.accelerator
    if t.method == "sft":
        loss = evaluate(learner.loss_module, data.eval, t.batch_size, data.pad_id, accelerator.device, accelerator,
                        data.pack_to)
        row = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}
    else:
        measured = evaluate_pairs(learner.loss_module, data.eval, t.batch_size, data.pad_id, accelerator.device,
                                  accelerator)
        row = {f"eval_{k}": v for k, v in measured.items()}
    release_freed_memory(accelerator.device)
    return row


def evaluate_pairs(loss_module: nn.Module, dataset: Dataset, batch_size: int, pad_id: int, device,
                   accelerator) -> dict[str, float]:
    """Pair-weighted means of the preference loss ('loss') and its metrics over the held-out pairs (all
    processes together; every process runs the same number of forward passes, as in `evaluate`)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    rounds = -(-len(dataset) // (batch_size * world))
    was_training = loss_module.training
    loss_module.eval()
    names, total = None, None
    with torch.no_grad():
        for i in range(rounds):
            start = (i * world + rank) * batch_size
            chunk = dataset.examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk or dataset.examples[:1], pad_id).items()}
            loss, n, stats = loss_module(**batch)
            names = names or ["loss", *stats]
            values = torch.stack([loss.detach().float(), *(stats[k].float() for k in names[1:])]).double()
            weight = float(n) if chunk else 0.0
            part = torch.cat([values * weight, torch.tensor([weight], dtype=torch.float64, device=values.device)])
            total = part if total is None else total + part
    total = accelerator.reduce(total.to(device), reduction="sum")
    loss_module.train(was_training)
    return {name: (total[i] / total[-1].clamp(min=1)).item() for i, name in enumerate(names)}


def _reference_cache(run: Run, data: Data, learner: Learner, start_step: int) -> None:
    """DPO with train.precompute_ref: each pair's reference log-probabilities, from the model as it
    starts, computed once before the first step and kept in the run folder (REF_FILE), so that a
    resumed run reads back the very numbers the interrupted one used."""
    path = run.plan.dir / REF_FILE
    sets = {"train": data.train, **({"eval": data.eval} if data.eval is not None else {})}
    if path.is_file():
        cached = read_tensors(path)
        for name, dataset in sets.items():
            if name not in cached or cached[name].shape != (len(dataset), 2):
                raise QLoraKitError(f"{path} does not hold this run's {name} pairs ({len(dataset)}): the data changed "
                                    "since the run began; start it again with --overwrite")
            for example, (chosen, rejected) in zip(dataset.examples, cached[name].tolist()):
                example.ref = (chosen, rejected)
        return
    if start_step:
        raise QLoraKitError(f"{path} is missing: this run's reference log-probabilities were computed before its "
                            "first step and cannot be computed again now; start the run again with --overwrite")
    model, t = learner.model, run.config.train
    was_training = model.training
    model.eval()  # no dropout: the reference is the starting model itself
    computed = {}
    with torch.no_grad():
        for name, dataset in sets.items():
            rows = []
            for start in range(0, len(dataset), t.batch_size):
                pairs = dataset.examples[start:start + t.batch_size]  # no ref yet: collate_pairs adds none
                batch = {k: v.to(run.accelerator.device) for k, v in collate_pairs(pairs, data.pad_id).items()}
                logps = sequence_logps(model, **batch, chunk_tokens=t.loss_chunk_tokens)[0].float().cpu()
                rows.append(torch.stack([logps[:len(pairs)], logps[len(pairs):]], dim=1))
            computed[name] = torch.cat(rows)
            for example, (chosen, rejected) in zip(dataset.examples, computed[name].tolist()):
                example.ref = (chosen, rejected)
    model.train(was_training)
    if run.main:
        with atomic_file(path) as tmp:
            save_file(computed, str(tmp))
    run.accelerator.wait_for_everyone()


def _append_row(plan: RunPlan, row: dict) -> None:
    path, line = plan.dir / "metrics.jsonl", json.dumps(row) + "\n"
    with disk_full_as_error(path, len(line), "metrics.jsonl", lambda: _disk_advice(plan)):
        with open(path, "a") as f:
            f.write(line)


def _checkpoint(run: Run, learner: Learner, step: int) -> None:
    """Write checkpoint step-N; every process takes part (the adapter, optimiser and RNG states are
    gathered for the main process to write)."""
    from accelerate.utils import gather_object

    rng_states = gather_object([rng_state()]) if run.accelerator.num_processes > 1 else [rng_state()]
    adapter, optim_state = full_lora_state(learner.model), optimizer_state(learner.optimizer, learner.sharded)
    if run.main:
        try:
            save_checkpoint(run.plan.dir, step, learner.model, adapter, optim_state,
                            trainer_state(learner.scheduler, learner.scaler), run.config.train.keep_last, rng_states,
                            advice=lambda: _disk_advice(run.plan))
        except NonFiniteCheckpoint as e:
            _diverged(run.plan, str(e))
    run.accelerator.wait_for_everyone()


def _disk_advice(plan: RunPlan) -> str:
    return f"free some space, then {plan.next_step()}"


def _all_finite(params: list[nn.Parameter], accelerator) -> bool:
    """Whether every adapter weight is finite in every process (a sharded process checks its own shard,
    and all of them agree, so none stops alone)."""
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params)
    if accelerator.num_processes > 1:
        bad = int(accelerator.reduce(torch.tensor(bad, device=accelerator.device), reduction="sum"))
    return bad == 0


def _diverged(plan: RunPlan, what: str) -> None:
    if plan.mode == "replace":
        raise QLoraKitError(f"{what}. Nothing was replaced: the previous run in {plan.final} is as it was. Lower "
                            "train.lr or check the data, then run again")
    last = latest_checkpoint(plan.dir)
    raise QLoraKitError(f"{what}. Last good checkpoint: {last or 'none yet'}. Lower train.lr, check the data, or "
                        "resume from the checkpoint")


def _read_history(path: Path, upto: int) -> list[dict]:
    """Metrics rows up to `upto` (a resumed run drops rows the interrupted run wrote after its checkpoint)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a row cut short by a kill or a full disk
            continue
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= upto]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


# ---------------------------------------------------------------- finish

def _save_final(run: Run, learner: Learner, history: list[dict]) -> None:
    """The final adapter (gathered from every process) and the loss plot, into the run folder."""
    adapter = full_lora_state(learner.model)
    if run.main:
        run_dir = run.plan.dir
        with disk_full_as_error(run_dir, _nbytes(adapter), "the final adapter", lambda: _disk_advice(run.plan)):
            save_adapter(learner.model, run_dir / "adapter", extra={"steps": learner.total_steps}, tensors=adapter)
            plot_history(history, run_dir / "loss.png")
    run.accelerator.wait_for_everyone()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * 4 for t in tensors.values())  # adapters are saved in fp32


def _finish(run: Run, learner: Learner, history: list[dict], eval_before: float | None, eval_after: float | None,
            export: bool | None) -> TrainResult:
    """The result, once the run is in its final place; and the merged model when asked for."""
    run_dir, config = run.plan.final, run.config
    result = TrainResult(run_dir, run_dir / "adapter", learner.total_steps, eval_before, eval_after, history,
                         time.time() - run.started)
    if run.main and (config.output.export if export is None else export):
        export_merged(learner.base, run_dir / "adapter", run_dir / "merged", dtype=config.output.export_dtype,
                      overwrite=True)
    return result


def plot_history(history: list[dict], out: Path) -> None:
    """Training loss (and held-out loss where measured) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in history if "loss" in r]
    eval_rows = [r for r in history if "eval_loss" in r]
    preference = any("rewards/margins" in r or "eval_rewards/margins" in r for r in history)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), squeeze=False)
    ax = axes[0][0]
    if train_rows:
        ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss", lw=1)
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="held-out loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("preference loss" if preference else "cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:  # what preference tuning is for: the chosen response's reward pulling ahead
        ax = axes[0][1]
        for key, label, style in (("rewards/margins", "train reward margin", "-"),
                                  ("eval_rewards/margins", "held-out reward margin", "o-")):
            rows = [r for r in history if key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=label, lw=1)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("reward(chosen) - reward(rejected)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(out, png.getvalue())
