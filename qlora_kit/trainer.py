"""The training loop: one config in, a trained adapter (and optionally a merged model) out.

    run = train("run.yaml")            # or train(RunConfig(...)), or `qlora-kit train run.yaml`

A run folder holds run.json (the config), metrics.jsonl, loss.png, checkpoints/step-N/ (adapter,
optimiser, scheduler, RNG and data position, each written atomically; the last `keep_last` kept)
and adapter/ (the final adapter, PEFT layout); qlora_kit.runs says when one may be started, resumed
or replaced. Nothing is written until training begins. `resume=True` continues from the newest
checkpoint and ends with the same adapter as an uninterrupted run: the data order depends only on
(seed, epoch), and every random state is restored. `overwrite=True` trains beside the old run and
replaces it only when the new one has finished.

Data-parallel runs go through accelerate (`accelerate launch`, or `torchrun` on CPU): each process
takes every world-th micro-batch, and gradients are averaged across processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import time
import warnings
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import save_adapter
from .config import RunConfig, config_from_dict, load_config
from .data import DataStats, build_dataset, collate, microbatches, prepare_tokenizer, read_jsonl, split
from .errors import QLoraKitError
from .fsdp import (full_lora_state, load_lora_state, load_optimizer_state, local_packed_bytes,
                   optimizer_state, shard_model)
from .io import atomic_write_bytes, atomic_write_text, disk_full_as_error
from .loading import load_model, set_gradient_checkpointing
from .lora import add_lora, lora_state_dict, trainable_parameters
from .losses import causal_lm_loss
from .modeltree import decoder_layers
from .models import resolve_model_path
from .optim import build_optimizer, build_scheduler
from .runs import (Checkpoint, NonFiniteCheckpoint, RunPlan, latest_checkpoint, newest_readable, plan_run, run_folder,
                   save_checkpoint)


_STEP_DELAY = float(os.environ.get("QLORA_KIT_STEP_DELAY", "0") or 0)


class LossModule(nn.Module):
    """Model + chunked loss as one module, so a data-parallel wrapper sees the whole forward."""

    def __init__(self, model: nn.Module, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, labels, attention_mask=None):
        return causal_lm_loss(self.model, input_ids, labels, attention_mask, self.chunk_tokens)


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    eval_before: float | None
    eval_after: float | None
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


MAX_SKIPPED_IN_A_ROW = 25  # fp16: from the initial scale 2^16 this is a scale below 2^-9, far past any overflow


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_checkpoint(ckpt: Checkpoint, model, optimizer, scheduler, rank: int, sharded: bool,
                       scaler: LossScaler | None = None) -> int:
    """Put a checkpoint's state into this run's model, optimiser, scheduler, loss scale and RNG; its step."""
    current = lora_state_dict(model)
    if set(ckpt.adapter) != set(current) or any(ckpt.adapter[k].shape != current[k].shape for k in current):
        raise QLoraKitError(f"checkpoint {ckpt.path} holds adapters of another shape (r={ckpt.lora.r}) than this run's")
    load_lora_state(model, ckpt.adapter)
    load_optimizer_state(optimizer, ckpt.optimizer, sharded)
    scheduler.load_state_dict(ckpt.state["scheduler"])
    if scaler is not None and scaler.enabled:
        scaler.load_state_dict(ckpt.state.get("loss_scale"), ckpt.path)
    _set_rng_state(ckpt.rng[rank])
    return ckpt.step


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


def announce_plan(model_path: Path, config: RunConfig, device: torch.device) -> None:
    """Print the memory plan in one line, and warn before loading if it will not fit."""
    from .fit import check_fits
    from .plan import plan_memory

    t = config.train
    try:
        plan = plan_memory(model_path, config.quant.build(), config.lora.build(t.seed), batch=t.batch_size,
                           seq_len=config.data.max_seq_len, gradient_checkpointing=t.gradient_checkpointing,
                           optimizer=t.optimizer, device=device.type, chunk_tokens=t.loss_chunk_tokens)
    except QLoraKitError as e:  # a model family the planner does not know must not stop training
        print(f"qlora-kit: no memory plan ({e})")
        return
    print(f"qlora-kit: {plan.summary()}")
    warning = check_fits(plan, device)
    if warning:
        warnings.warn(warning, stacklevel=2)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def evaluate(loss_module: nn.Module, dataset, batch_size: int, pad_id: int, device, accelerator) -> float:
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
            batch = {k: v.to(device) for k, v in collate(chunk or dataset.examples[:1], pad_id).items()}
            loss, n = loss_module(**batch)
            if chunk:
                total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
    total = accelerator.reduce(total, reduction="sum")
    loss_module.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def train(config: RunConfig | dict | str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True,
          export: bool | None = None) -> TrainResult:
    """Fine-tune with LoRA on a quantised base as `config` says (a RunConfig, a YAML file, or a dict
    with the YAML's sections); see the module docstring."""
    from accelerate import Accelerator

    if isinstance(config, dict):
        config = config_from_dict(config)
    config = load_config(config) if isinstance(config, (str, Path)) else config.validate()
    t, d = config.train, config.data
    cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    say = print if main else (lambda *_: None)
    # What happens to output.dir is settled before anything is read, and nothing is written there
    # until training begins: a bad data file or model costs no run folder.
    plan = _decided_on_main(accelerator, lambda: plan_run(config, resume, overwrite))
    started = time.time()

    # Data first: a bad data file should fail before a model is loaded.
    stats = DataStats()
    records = read_jsonl(d.train, d.on_bad_line, stats)[: d.max_examples]
    if d.eval:
        train_records, eval_records = records, read_jsonl(d.eval, d.on_bad_line, stats)
    else:
        train_records, eval_records = split(records, d.eval_fraction, t.seed)

    model_path = resolve_model_path(config.model.path)
    quant = config.quant.build()
    if main:
        announce_plan(model_path, config, device)
    model, tokenizer = load_model(model_path, quant=quant, device=device, trust_remote_code=config.model.trust_remote_code,
                                  progress=progress and main)
    tokenizer = prepare_tokenizer(tokenizer)
    train_set = build_dataset(train_records, tokenizer, d.max_seq_len, d.packing, stats)
    eval_set = build_dataset(eval_records, tokenizer, d.max_seq_len, False) if eval_records else None
    add_lora(model, config.lora.build(t.seed))
    set_gradient_checkpointing(model, t.gradient_checkpointing)
    trainable, total_params = trainable_parameters(model)

    per_step = t.batch_size * t.grad_accum * world
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(train_set) / per_step))
    sharded = t.fsdp and world > 1
    if sharded:  # FSDP2: each process keeps 1/world of every block's weights, packed 4-bit ones included
        shard_model(model)
        loss_module = LossModule(model, t.loss_chunk_tokens)
        local, full = local_packed_bytes(model)
        say(f"qlora-kit: fsdp over {world} processes: this process holds {local:,} of {full:,} bytes "
            "of packed 4/8-bit weights")
    else:
        loss_module = accelerator.prepare(LossModule(model, t.loss_chunk_tokens))
    # After sharding: FSDP replaces each parameter by a sharded one, and the optimiser must hold those.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    scheduler = build_scheduler(optimizer, t.schedule, t.warmup_steps, total_steps)
    compute_dtype = model.get_input_embeddings().weight.dtype  # the loader's resolved compute dtype
    if sharded and compute_dtype == torch.float16:
        raise QLoraKitError("fp16 compute with fsdp: true is not supported (its loss scaling would have to see "
                            "every shard); set quant.compute_dtype: bf16 (or fp32), or train without fsdp")
    scaler = LossScaler(compute_dtype == torch.float16, device)
    if scaler.enabled:  # a skipped first step is expected, and the schedule follows steps, not updates
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")

    start_step = 0
    if plan.mode == "resume":
        ckpt = newest_readable(plan.dir, world, say)
        start_step = restore_checkpoint(ckpt, model, optimizer, scheduler, rank, sharded, scaler)
    else:
        torch.manual_seed(t.seed + rank)  # dropout masks differ per process, reproducibly
    say(f"qlora-kit: {model_path.name}, {trainable:,} trainable of {total_params:,} params "
        f"({100 * trainable / total_params:.2f}%); data: {stats.summary()}; {total_steps} steps of "
        f"{per_step} sequences" + (f"; resuming at step {start_step}" if start_step else ""))

    with run_folder(plan, config, main, say) as run_dir:
        accelerator.wait_for_everyone()
        metrics_path = run_dir / "metrics.jsonl"
        history = _read_history(metrics_path, upto=start_step) if main and plan.mode == "resume" else []
        eval_before = None
        if eval_set is not None and start_step == 0:
            eval_before = evaluate(loss_module, eval_set, t.batch_size, tokenizer.pad_token_id, device, accelerator)
            history.append({"step": 0, "eval_loss": eval_before, "eval_ppl": math.exp(min(eval_before, 50))})
        eval_after = _loop(plan, model, loss_module, optimizer, scheduler, scaler, params, train_set, eval_set,
                           tokenizer.pad_token_id, start_step, total_steps, history, accelerator, progress, config)
        if eval_after is None:
            eval_after = eval_before
        adapter = full_lora_state(model)
        if main:
            with disk_full_as_error(run_dir, _nbytes(adapter), "the final adapter", lambda: _disk_advice(plan)):
                save_adapter(model, run_dir / "adapter", extra={"steps": total_steps}, tensors=adapter)
                plot_history(history, run_dir / "loss.png")
        accelerator.wait_for_everyone()
    run_dir = plan.final
    result = TrainResult(run_dir, run_dir / "adapter", total_steps, eval_before, eval_after, history,
                         time.time() - started)
    if main and (config.output.export if export is None else export):
        from .export import export_merged  # the exporter streams from the base folder
        export_merged(model_path, run_dir / "adapter", run_dir / "merged", dtype=config.output.export_dtype,
                      overwrite=True)
    return result


def _loop(plan: RunPlan, model, loss_module, optimizer, scheduler, scaler: LossScaler, params, train_set, eval_set,
          pad_id: int, start_step: int, total_steps: int, history: list[dict], accelerator, progress: bool,
          config: RunConfig) -> float | None:
    """The optimiser steps from start_step + 1 to total_steps, with metrics, evals and checkpoints; the
    last held-out loss measured (None when none was)."""
    from accelerate.utils import gather_object

    t = config.train
    device, rank, world, main = (accelerator.device, accelerator.process_index, accelerator.num_processes,
                                 accelerator.is_main_process)
    sharded = t.fsdp and world > 1
    metrics_path = plan.dir / "metrics.jsonl"
    eval_after = None
    batches = microbatches(train_set, t.batch_size, t.seed, start_step * t.grad_accum * world, rank, world)
    with tqdm(total=total_steps, initial=start_step, desc="training", unit="step",
              disable=not (progress and main)) as bar:
        loss_module.train()
        for step in range(start_step + 1, total_steps + 1):
            tick, tokens, losses = time.time(), 0, []
            for micro in range(t.grad_accum):
                _, batch = next(batches)
                batch = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
                sync = micro == t.grad_accum - 1
                if sharded:
                    for layer in decoder_layers(model):
                        layer.set_requires_gradient_sync(sync)
                with contextlib.nullcontext() if sync or sharded else accelerator.no_sync(loss_module):
                    loss, _ = loss_module(**batch)
                    accelerator.backward(scaler.scale(loss / t.grad_accum))
                losses.append(loss.detach())
                tokens += int(batch["attention_mask"].sum())
            step_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
            if not math.isfinite(step_loss) and not scaler.enabled:  # fp16: an overflow, the scaler skips the step
                _diverged(plan, f"the loss became {step_loss} at step {step}; training stopped before the optimiser "
                                "step")
            scaler.unscale(optimizer)
            if t.max_grad_norm:
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
            taken = scaler.step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if scaler.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                _diverged(plan, f"{scaler.skipped_in_a_row} fp16 steps in a row overflowed (loss {step_loss} at "
                                f"step {step}, loss scale now {scaler.scale_value:g}): lowering the scale no longer "
                                "helps, so the model itself has diverged or fp16 cannot hold its activations. Use "
                                "quant.compute_dtype: bf16 or fp32 if the hardware has it")
            if taken and not _all_finite(params, accelerator):
                _diverged(plan, f"the adapter weights became non-finite at step {step} (loss {step_loss})")

            elapsed = time.time() - tick
            row = {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": tokens * world / elapsed, "mem_mb": memory_mb(device)}
            if scaler.enabled:
                row.update(skipped=not taken, loss_scale=scaler.scale_value, skipped_steps=scaler.skipped)
            if eval_set is not None and (step % t.eval_every == 0 or step == total_steps):
                eval_after = evaluate(loss_module, eval_set, t.batch_size, pad_id, device, accelerator)
                row.update(eval_loss=eval_after, eval_ppl=math.exp(min(eval_after, 50)))
            history.append(row)
            if main:
                line = json.dumps(row) + "\n"
                with disk_full_as_error(metrics_path, len(line), "metrics.jsonl", lambda: _disk_advice(plan)):
                    with open(metrics_path, "a") as f:
                        f.write(line)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}",
                            mem=f"{row['mem_mb']:.0f}MB", **({"skipped": scaler.skipped} if scaler.enabled else {}))
            bar.update(1)
            if _STEP_DELAY:
                time.sleep(_STEP_DELAY)  # lets tests kill a run between checkpoints
            if step % t.save_every == 0 or step == total_steps:
                rng_states = gather_object([_rng_state()]) if world > 1 else [_rng_state()]
                adapter, optim_state = full_lora_state(model), optimizer_state(optimizer, sharded)
                if main:
                    trainer_state = {"scheduler": scheduler.state_dict(),
                                     **({"loss_scale": scaler.state_dict()} if scaler.enabled else {})}
                    try:
                        save_checkpoint(plan.dir, step, model, adapter, optim_state, trainer_state, t.keep_last,
                                        rng_states, advice=lambda: _disk_advice(plan))
                    except NonFiniteCheckpoint as e:
                        _diverged(plan, str(e))
                accelerator.wait_for_everyone()
    if scaler.enabled and main:
        print(f"qlora-kit: fp16 loss scaling skipped {scaler.skipped} of {total_steps} steps (overflow); "
              f"final scale {scaler.scale_value:g}")
    return eval_after


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * 4 for t in tensors.values())  # adapters are saved in fp32


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


def plot_history(history: list[dict], out: Path) -> None:
    """Training loss (and held-out loss where measured) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in history if "loss" in r]
    eval_rows = [r for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_rows:
        ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss", lw=1)
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="held-out loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(out, png.getvalue())
