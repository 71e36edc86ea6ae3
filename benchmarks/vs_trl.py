"""The demo's fine-tune through TRL's SFTTrainer and through qlora_kit: wall time, real tokens/s, peak RSS,
held-out loss, and whether TRL's adapters got gradients at all.

    python benchmarks/vs_trl.py [--epochs 1] [--max-steps N] [--heldout N] [--dtype auto|bf16|fp32]
                                [--trl-eval-first] [--answer-tokens 32] [--seed 0] [--out DIR]

What runs, each side in its own child process (imports, allocator state and peak RSS do not mix):

  trl        transformers `BitsAndBytesConfig` (NF4, double quant, compute dtype = what qlora_kit's
             "auto" resolves to on this device, or --dtype), peft `LoraConfig` (r16, alpha 32, dropout
             0.05, "all-linear"), TRL `SFTTrainer` + `SFTConfig` with the demo's settings: batch 8,
             max length 128, lr 1e-3, cosine schedule, 5 warm-up steps, paged 8-bit AdamW, gradient
             clipping at 1.0, no held-out evaluation while training. The data are the demo's trivia
             records in TRL's prompt-completion form, so TRL trains on the answers only, as we do.
  trl-eval-first  (with --trl-eval-first) the same, after one `trainer.evaluate()` on the held-out
             set before training, as a user who wants a before/after loss writes it. On CPUs with
             AVX512-BF16 that eval-mode pass is what repacks bitsandbytes' weights.
  qlora_kit  `qlora_kit.train` on the same records written as JSONL, with the same settings and
             everything else at its defaults (packing on, gradient checkpointing as the memory plan
             decides); no held-out evaluation while training either.

Then one scoring child loads the base 4-bit with qlora_kit's `load_model`, and for the base and each
saved adapter (qlora_kit's `load_adapter` reads PEFT's layout, so TRL's adapter loads the same way)
computes the token-weighted mean loss on the held-out assistant answers, the same code for every
side, and asks the held-out questions greedily to score format compliance (qlora_kit.demo_task).

Measured, per training side:

  wall time     from the start of loading the model to the adapter saved (tokenising included);
  step time     the optimiser steps alone, summed (TRL: a callback's clock around each step;
                qlora_kit: each metrics row's real tokens / its tokens/s);
  tokens/s      real (non-pad) tokens trained on / step time;
  peak RSS      the child's resident-memory high-water mark (wait4's ru_maxrss);
  gradients     (TRL sides) at the first optimiser step, for every LoRA layer, whether lora_B's
                gradient is non-zero (B starts at zero, so lora_A's gradient is zero at step 1 in any
                correct run and is checked once B has moved), how many base layers bitsandbytes had
                repacked for its inference kernel (at every step), and any warning that `gemv_4bit`
                (no autograd) was back-propagated through. A side with any of these is flagged
                "peer not training correctly": its speed is then not a comparison, and no ratio is
                printed for it.

Settings that cannot match (listed in results.json too): the data order and dropout masks (each
side's own RNG, --seed for both), the adapters' initial A (each side's init, seeded), the warm-up
shape (ours (s+1)/(w+1), transformers' s/w), padding (TRL pads each batch to its longest example,
as it ships; we pack, as we ship), gradient checkpointing (TRL: every block; ours: the memory plan's
choice), and TRL's bf16 autocast against our bf16 compute dtype.

Writes results.json and chart.png (training loss per step, and the figures as bars) to --out.
Figures from a busy machine are not comparisons: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from plan_accuracy import cpu_kind  # noqa: E402

BATCH, MAX_LEN, LR, WARMUP = 8, 128, 1e-3, 5        # qlora_kit.demo's settings
R, ALPHA, DROPOUT = 16, 32, 0.05
MIB = 2 ** 20
BROKEN = "peer not training correctly: its speed is not a comparison"


# ------------------------------------------------------------------ data

def demo_records(heldout: int | None) -> tuple[list[dict], list[dict]]:
    from qlora_kit.demo_task import task_records

    train, held = task_records()
    return train, held[:heldout]


def as_prompt_completion(record: dict) -> dict:
    """A chat record in TRL's prompt-completion form: TRL then computes the loss on the completion only."""
    return {"prompt": record["messages"][:-1], "completion": record["messages"][-1:]}


# ------------------------------------------------------------------ child: TRL

def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from qlora_kit.dtypes import resolve_dtype
    from qlora_kit.models import smollm2_path

    # torch reports a backward through an op without an autograd kernel (bitsandbytes' gemv_4bit) as a
    # Python UserWarning; "always" so that it is kept however often it repeats, and still shown.
    caught: list[str] = []
    warnings.simplefilter("always")
    shown = warnings.showwarning

    def keep(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        caught.append(f"{category.__name__}: {message}")
        shown(message, category, filename, lineno, file, line)
    warnings.showwarning = keep

    import datasets
    import transformers

    datasets.disable_progress_bars()  # keep the printout to the figures
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    dtype = resolve_dtype(args.dtype)
    train, held = demo_records(args.heldout)
    started = time.perf_counter()
    folder = smollm2_path()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype, device_map={"": "cpu"})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = SFTConfig(
        output_dir=str(Path(args.out) / "trl-run"), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        num_train_epochs=args.epochs, max_steps=args.max_steps or -1, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=WARMUP, optim="paged_adamw_8bit", weight_decay=0.0, max_grad_norm=1.0, max_length=MAX_LEN,
        bf16=dtype == torch.bfloat16, logging_steps=1, eval_strategy="no",
        save_strategy="no", report_to="none", seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")
    check = GradientCheck()
    clock = StepClock()

    class CountingTrainer(SFTTrainer):
        """SFTTrainer that counts the real (attention-mask) tokens of every training batch."""
        real_tokens = 0

        def compute_loss(self, model, inputs, *a, **k):
            if model.training:
                self.real_tokens += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *a, **k)

    class Callbacks(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.begin()

        def on_pre_optimizer_step(self, _args, state, *_, model=None, **__):
            check.record(model, state.global_step + 1)

        def on_step_end(self, *_, **__):
            clock.end()

    trainer = CountingTrainer(
        model=model, args=config, processing_class=tokenizer, peft_config=lora, callbacks=[Callbacks()],
        train_dataset=Dataset.from_list([as_prompt_completion(r) for r in train]),
        eval_dataset=Dataset.from_list([as_prompt_completion(r) for r in held]))
    if args.eval_first:  # the held-out loss before training, as a user measures it: one eval-mode, no-grad pass
        trainer.evaluate()
    output = trainer.train()
    adapter = Path(args.out) / f"{args.child}-adapter"
    trainer.save_model(str(adapter))
    wall = time.perf_counter() - started
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    gemv = [w for w in caught if "gemv_4bit" in w]
    gradients = check.report()
    gradients["broken"] |= bool(gemv)  # a backward through gemv_4bit drops that layer's input gradient
    return {"adapter": str(adapter), "wall_s": wall, "step_s": clock.total, "steps": trainer.state.global_step,
            "real_tokens": trainer.real_tokens, "losses": losses, "train_runtime_s": output.metrics["train_runtime"],
            "compute_dtype": str(dtype), "gradients": gradients,
            "gradient_checkpointing": getattr(config, "activation_checkpointing", None), "gemv_4bit_warnings": len(gemv),
            "gemv_4bit_warning": gemv[0][:400] if gemv else None, "gemv_4bit_warned": bool(gemv)}


class StepClock:
    """Seconds spent inside optimiser steps (forward, backward, update), summed over the run."""

    def __init__(self):
        self.total, self._t = 0.0, None

    def begin(self):
        self._t = time.perf_counter()

    def end(self):
        if self._t is not None:
            self.total += time.perf_counter() - self._t
            self._t = None


class GradientCheck:
    """Which LoRA layers of a PEFT model got a gradient, read before the optimiser steps.

    lora_B starts at zero, so in a correct run lora_A's gradient (scale * B^T g x^T) is zero until B
    has moved: B's gradient is checked at the first step, A's at the first step where that layer's
    B is non-zero (with transformers' warm-up the first step's learning rate is 0, so that is step 3
    at the earliest). Also counts, at every step, the base layers bitsandbytes has repacked for its
    inference kernel: an evaluation in the middle of training would repack them there."""

    def __init__(self, max_step: int = 12):
        self.max_step = max_step
        self.b_grad: dict[str, float] = {}
        self.a_grad: dict[str, tuple[int, float]] = {}
        self.repacked: dict[int, int] = {}
        self.quantised = 0

    def record(self, model, step: int) -> None:
        import bitsandbytes as bnb

        repacked = quantised = 0
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                quantised += 1
                repacked += bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))
            if step > self.max_step or not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
                continue
            name = name.removeprefix("base_model.model.")
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            norm = lambda t: 0.0 if t.grad is None else t.grad.float().norm().item()  # noqa: E731
            self.b_grad.setdefault(name, norm(b))
            if name not in self.a_grad and bool(b.detach().abs().sum() > 0):
                self.a_grad[name] = (step, norm(a))
        self.repacked[step], self.quantised = repacked, quantised

    def report(self) -> dict:
        """Shares of LoRA layers whose lora_B (first step) or lora_A (first step after B moved) got no
        gradient; broken when either share is above zero, a base layer was repacked, or nothing was checked."""
        def dead(grads: dict) -> dict:
            names = sorted(n for n, g in grads.items() if g == 0.0)
            kinds: dict[str, int] = {}
            for n in names:
                kinds[n.rsplit(".", 1)[-1]] = kinds.get(n.rsplit(".", 1)[-1], 0) + 1
            return {"layers": len(grads), "no_gradient": len(names),
                    "no_gradient_share": len(names) / max(1, len(grads)), "no_gradient_by_projection": kinds}

        repacked = {s: n for s, n in self.repacked.items() if n}
        out = {"lora_B_step1": dead(self.b_grad),
               "lora_A_after_B_moved": {**dead({n: g for n, (_, g) in self.a_grad.items()}),
                                        "at_steps": sorted({s for s, _ in self.a_grad.values()})},
               "repacked_base_layers": max(self.repacked.values(), default=0), "quantised_base_layers": self.quantised,
               "first_step_repacked": min(repacked, default=None)}
        # a repacked layer trains through gemv_4bit, which passes no gradient to its input
        out["broken"] = (not self.b_grad or out["lora_B_step1"]["no_gradient"] > 0
                         or out["lora_A_after_B_moved"]["no_gradient"] > 0 or bool(repacked))
        return out


# ------------------------------------------------------------------ child: qlora_kit

def child_ours(args) -> dict:
    import torch

    from qlora_kit.config import config_from_dict
    from qlora_kit.data import build_dataset, microbatches, prepare_tokenizer, read_jsonl
    from qlora_kit.datasets import write_jsonl
    from qlora_kit.loading import load_tokenizer_from
    from qlora_kit.models import smollm2_path
    from qlora_kit.trainer import real_tokens, train

    torch.manual_seed(args.seed)
    records, _ = demo_records(args.heldout)
    data = Path(args.out) / "train.jsonl"
    write_jsonl(records, data)
    folder = smollm2_path()
    config = config_from_dict({
        "model": {"path": str(folder)}, "quant": {"compute_dtype": args.dtype},
        "lora": {"r": R, "alpha": ALPHA, "dropout": DROPOUT},
        "data": {"train": str(data), "eval_fraction": 0, "max_seq_len": MAX_LEN},
        "train": {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": BATCH, "lr": LR,
                  "warmup_steps": WARMUP, "schedule": "cosine", "seed": args.seed, "eval_every": 10 ** 9,
                  "save_every": 10 ** 9},
        "output": {"dir": str(Path(args.out) / "ours-run")},
    })
    started = time.perf_counter()
    result = train(config, overwrite=True, progress=False)
    wall = time.perf_counter() - started
    # The trainer's rows give tokens/s per step; the same batches, drawn again, give each step's tokens.
    tokenizer = prepare_tokenizer(load_tokenizer_from(folder))
    dataset = build_dataset(read_jsonl(data), tokenizer, MAX_LEN)
    batches = microbatches(dataset, BATCH, args.seed)
    rows = [r for r in result.history if "loss" in r]
    tokens = [real_tokens(next(batches)[1]) for _ in rows]
    step_s = sum(n / r["tokens_per_s"] for n, r in zip(tokens, rows))
    return {"adapter": str(result.adapter_dir), "wall_s": wall, "step_s": step_s, "steps": result.steps,
            "real_tokens": sum(tokens), "losses": [r["loss"] for r in rows], "compute_dtype": args.dtype,
            "packing": config.data.packing, "gradient_checkpointing": config.train.gradient_checkpointing}


# ------------------------------------------------------------------ child: scoring (one function for all)

def child_score(args) -> dict:
    """Held-out answer loss (and format compliance when --answer-tokens > 0) of the base and each adapter."""
    import torch

    from qlora_kit.adapters import load_adapter
    from qlora_kit.config import QuantConfig
    from qlora_kit.data import build_dataset, collate, prepare_tokenizer
    from qlora_kit.demo_task import SYSTEM, question_of, reference_of, score
    from qlora_kit.generation import generate
    from qlora_kit.loading import load_model
    from qlora_kit.models import smollm2_path
    from qlora_kit.trainer import LossModule

    _, held = demo_records(args.heldout)
    adapters = json.loads(args.adapters)
    out = {}
    for label, path in {"base": None, **adapters}.items():
        model, tok = load_model(smollm2_path(), quant=QuantConfig(compute_dtype=args.dtype), progress=False)
        tok = prepare_tokenizer(tok)
        if path is not None:
            load_adapter(model, path)
        dataset = build_dataset(held, tok, MAX_LEN)
        loss_module = LossModule(model, 1024).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(dataset), BATCH):
                loss, n = loss_module(**collate(dataset.examples[start:start + BATCH], tok.pad_token_id))
                total, count = total + loss.item() * int(n), count + int(n)
        out[label] = {"heldout_loss": total / count}
        if args.answer_tokens:
            replies = generate(model, tok, [question_of(r) for r in held], max_new_tokens=args.answer_tokens,
                               system=SYSTEM, batch_size=BATCH)
            out[label].update(score(replies, [reference_of(r) for r in held]), first_reply=replies[0])
        del model
    return out


# ------------------------------------------------------------------ parent

def run_child(name: str, args, extra: list[str] = ()) -> dict:
    """Run one side in a fresh process; its last stdout line is its JSON result. The child's own peak RSS
    comes from wait4 (a parent's RUSAGE_CHILDREN would be the maximum over every child so far)."""
    cmd = [sys.executable, __file__, "--child", name, "--out", str(args.out), "--dtype", args.dtype,
           "--epochs", str(args.epochs), "--max-steps", str(args.max_steps or 0), "--heldout", str(args.heldout or 0),
           "--answer-tokens", str(args.answer_tokens), "--seed", str(args.seed), *extra]
    print(f"running {name} ...", flush=True)
    started = time.perf_counter()
    log = args.out / f"{name}.stdout"
    with open(log, "w") as stdout:  # a file, not a pipe: a chatty child cannot block on a full pipe
        proc = subprocess.Popen(cmd, stdout=stdout, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} child failed (exit {os.waitstatus_to_exitcode(status)}); its output: {log}")
    result = json.loads(log.read_text().strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - started
    result["peak_rss_mib"] = usage.ru_maxrss * 1024 / MIB
    return result


def summarise(r: dict) -> dict:
    return {"wall_s": r["wall_s"], "step_s": r["step_s"], "steps": r["steps"], "real_tokens": r["real_tokens"],
            "tokens_per_s": r["real_tokens"] / r["step_s"] if r["step_s"] else float("nan"),
            "peak_rss_mib": r["peak_rss_mib"], "loss_first": r["losses"][0] if r["losses"] else None,
            "loss_last": r["losses"][-1] if r["losses"] else None}


def chart(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(results["sides"])
    fig, axes = plt.subplots(1, 5, figsize=(19, 3.8))
    for side in sides:
        losses = results["raw"][side]["losses"]
        axes[0].plot(range(1, len(losses) + 1), losses, label=side)
    axes[0].set(title="training loss per step", xlabel="step")
    axes[0].legend(fontsize=8)
    panels = [("wall_s", "wall time, s (load to saved adapter)"), ("tokens_per_s", "real tokens/s"),
              ("peak_rss_mib", "peak RSS, MiB")]
    colors = ["tab:blue", "tab:orange", "tab:red"]
    for ax, (key, title) in zip(axes[1:4], panels):
        values = [results["sides"][s][key] for s in sides]
        ax.bar(sides, values, color=colors[:len(sides)])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    labels = ["base", *sides]
    values = [results["heldout"]["base"]["heldout_loss"]] + [results["heldout"][s]["heldout_loss"] for s in sides]
    axes[4].bar(labels, values, color=["tab:gray", *colors[:len(sides)]])
    for i, v in enumerate(values):
        axes[4].text(i, v, f"{v:.2f}", ha="center", va="bottom")
    axes[4].set_title("held-out answer loss (lower is better)", fontsize=10)
    axes[4].tick_params(axis="x", labelsize=8)
    broken = [s for s in sides if results["raw"][s].get("gradients", {}).get("broken")]
    if broken:
        fig.suptitle(f"{', '.join(broken)}: {BROKEN}", color="red")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop both sides after this many steps (0: epochs)")
    p.add_argument("--heldout", type=int, default=None, help="score on the first N held-out questions (all: 26)")
    p.add_argument("--answer-tokens", type=int, default=32, help="greedy answer length for format compliance (0: skip)")
    p.add_argument("--dtype", default="auto", help="compute dtype of both sides (auto: qlora_kit's choice here)")
    p.add_argument("--trl-eval-first", action="store_true",
                   help="also run TRL with one held-out evaluation before training")
    p.add_argument("--seed", type=int, default=0, help="both sides' seed (data order, dropout masks, initial A)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", choices=["trl", "trl-eval-first", "qlora_kit", "score"], help=argparse.SUPPRESS)
    p.add_argument("--adapters", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.max_steps = args.max_steps or None
    args.heldout = args.heldout or None

    if args.child:
        args.eval_first = args.child == "trl-eval-first"
        child = {"trl": child_trl, "trl-eval-first": child_trl, "qlora_kit": child_ours, "score": child_score}
        print(json.dumps(child[args.child](args)))
        return

    from qlora_kit.dtypes import dtype_name, resolve_dtype

    args.dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype_name(resolve_dtype(args.dtype))]
    args.out = args.out or Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_kind()
    print(f"{cpu}; compute dtype {args.dtype}")
    sides = ["qlora_kit", "trl"] + (["trl-eval-first"] if args.trl_eval_first else [])
    raw = {side: run_child(side, args) for side in sides}
    heldout = run_child("score", args, ["--adapters", json.dumps({s: raw[s]["adapter"] for s in sides})])
    for key in ("process_wall_s", "peak_rss_mib"):
        heldout.pop(key, None)
    summary = {s: summarise(raw[s]) for s in sides}
    for s in sides:
        summary[s]["heldout_loss_after"] = heldout[s]["heldout_loss"]
        summary[s]["format_after"] = heldout[s].get("format")

    ours, trl = summary["qlora_kit"], summary["trl"]
    trl_broken = raw["trl"]["gradients"]["broken"]
    ratios = {"wall_s": ours["wall_s"] / trl["wall_s"], "step_s": ours["step_s"] / trl["step_s"],
              "tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
              "peak_rss": ours["peak_rss_mib"] / trl["peak_rss_mib"]}
    base = heldout["base"]["heldout_loss"]
    print(f"\n{cpu}\ndemo data: {len(demo_records(None)[0])} training records, held out "
          f"{args.heldout or 26}; batch {BATCH}, max length {MAX_LEN}, lr {LR}, r{R}/alpha {ALPHA}, "
          f"{'max_steps ' + str(args.max_steps) if args.max_steps else f'{args.epochs:g} epoch(s)'}, "
          f"compute dtype {args.dtype}")
    print(f"{'':16s}{'steps':>6s}{'wall s':>9s}{'step s':>9s}{'real tok':>10s}{'tok/s':>8s}{'peak RSS':>10s}"
          f"{'held-out loss':>22s}{'format':>8s}")
    for s in sides:
        v = summary[s]
        fmt = "" if v["format_after"] is None else f"{v['format_after']:.0%}"
        print(f"{s:16s}{v['steps']:6d}{v['wall_s']:9.1f}{v['step_s']:9.1f}{v['real_tokens']:10d}"
              f"{v['tokens_per_s']:8.1f}{v['peak_rss_mib']:8.0f}Mi{base:11.3f} -> {v['heldout_loss_after']:6.3f}"
              f"{fmt:>8s}")
    for s in sides:
        if not s.startswith("trl"):
            continue
        g = raw[s]["gradients"]
        for key, what in (("lora_B_step1", "lora_B gradient at the first step"),
                          ("lora_A_after_B_moved", "lora_A gradient once lora_B had moved")):
            c = g[key]
            when = f" (steps {c['at_steps']})" if "at_steps" in c else ""
            print(f"{s}: {c['no_gradient']} of {c['layers']} LoRA layers got no {what}{when}: "
                  f"{c['no_gradient_share']:.0%} {c['no_gradient_by_projection'] or ''}")
        print(f"{s}: {g['repacked_base_layers']} of {g['quantised_base_layers']} 4-bit base layers repacked by "
              "bitsandbytes for its inference kernel" +
              (f" (from step {g['first_step_repacked']})" if g["first_step_repacked"] else ""))
        print(f"{s}: bitsandbytes/torch warned that gemv_4bit was back-propagated through: "
              f"{'YES' if raw[s]['gemv_4bit_warned'] else 'no'}")
        if g["broken"]:
            print(f"!!! {s}: {BROKEN.upper()} !!!")
    if trl_broken:
        print(f"ratios qlora_kit / trl not reported: trl is a {BROKEN}")
    else:
        print(f"ratios qlora_kit / trl: wall time {ratios['wall_s']:.2f}x, step time {ratios['step_s']:.2f}x, "
              f"real tokens/s {ratios['tokens_per_s']:.2f}x, peak RSS {ratios['peak_rss']:.2f}x; held-out loss "
              f"{ours['heldout_loss_after']:.3f} vs {trl['heldout_loss_after']:.3f}")
    results = {
        "cpu": cpu, "compute_dtype": args.dtype, "epochs": args.epochs, "max_steps": args.max_steps,
        "heldout": args.heldout or 26,
        "settings": {"batch": BATCH, "max_length": MAX_LEN, "lr": LR, "warmup_steps": WARMUP, "schedule": "cosine",
                     "r": R, "alpha": ALPHA, "dropout": DROPOUT, "optimizer": "paged_adamw_8bit", "seed": args.seed},
        "not_matched": ["data order and dropout masks (each side's RNG)", "initial lora_A (each side's seeded init)",
                        "warm-up shape: ours (s+1)/(w+1), transformers s/w",
                        "batches: TRL pads to the longest example, qlora_kit packs (each side's default)",
                        "gradient checkpointing: TRL every block, qlora_kit the memory plan's choice",
                        "TRL computes under bf16 autocast where the dtype is bf16; qlora_kit in its compute dtype"],
        "sides": summary, "heldout": heldout, "trl_broken": trl_broken,
        "verdict": BROKEN if trl_broken else "both sides trained (every LoRA layer got a gradient)",
        "ratios": None if trl_broken else ratios, "raw": raw}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    chart(results, args.out / "chart.png")
    print(f"results in {args.out / 'results.json'}, chart in {args.out / 'chart.png'}")


if __name__ == "__main__":
    main()
