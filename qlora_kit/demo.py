"""The main job: fine-tune SmolLM2-135M-Instruct (4-bit) to answer trivia in a JSON shape, on a CPU.

    python -m qlora_kit.demo [--out runs/demo] [--epochs 2] [--method sft|dpo|orpo] [--quick]

With --method dpo or orpo the same task is learnt from preferences instead: the corpus' JSON answer
is chosen, the base model's own reply to the same question rejected (qlora_kit.demo_task), and the
summary adds the held-out reward margin and accuracy before and after.

Asks the held-out questions before and after training with the same instruction (see
qlora_kit.demo_task), and prints what the fine-tune bought: held-out loss, format compliance, answer
length and factual accuracy, the first few answers side by side, each phase's wall time and the
peak memory. Saves the adapter, exports a merged bf16 model, and writes the summary as
summary.json and summary.md beside them. Everything comes from installed packages.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .adapters import load_adapter
from .config import config_from_dict
from .datasets import write_jsonl
from .demo_task import SYSTEM, preference_pairs, question_of, reference_of, score, task_records
from .export import export_merged
from .generation import generate
from .io import atomic_write_text
from .loading import load_model
from .models import smollm2_path
from .trainer import train

SHOWN = 4  # answers in the before/after table: the first SHOWN held-out questions, no picking


class Phases:
    """Wall time per named phase, in the order they ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peak_memory_mib() -> dict:
    """Peak resident memory of this process (and peak CUDA allocation where a GPU ran)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20}
    if torch.cuda.is_available():
        out["cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def ask(model_dir: Path, questions: list[str], answer_tokens: int, adapter: Path | None = None,
        batch_size: int = 1) -> list[str]:
    model, tok = load_model(model_dir, progress=False)
    if adapter is not None:
        load_adapter(model, adapter)
    replies = generate(model, tok, questions, max_new_tokens=answer_tokens, system=SYSTEM, progress=True,
                       batch_size=batch_size)
    del model
    return replies


def base_replies(model_dir: Path, questions: list[str], answer_tokens: int, cache: Path) -> list[str]:
    """The base model's replies to the training questions (the rejected side of the pairs), kept in
    `cache` so that a second preference run on the same questions does not generate them again."""
    key = {"model": str(model_dir), "answer_tokens": answer_tokens, "questions": questions}
    try:
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved["replies"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    replies = ask(model_dir, questions, answer_tokens, batch_size=8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps({"key": key, "replies": replies}))
    return replies


LOSS_LABELS = {"sft": "loss on the reference answers", "dpo": "DPO loss on the held-out pairs",
               "orpo": "ORPO loss on the held-out pairs"}
# DPO at 5e-4 drove the margin to 15 and the generations into repeated '{"' within 30 steps (it keeps
# lowering the rejected replies' likelihood, the chosen one's with it); ORPO's SFT term holds it.
LEARNING_RATES = {"sft": 1e-3, "dpo": 1e-4, "orpo": 5e-4}


def run(out: Path, epochs: float = 2.0, max_steps: int | None = None, export: bool = True,
        overwrite: bool = True, answer_tokens: int = 32, scored: int | None = None, method: str = "sft",
        trained_on: int | None = None) -> dict:
    """The demo; `scored` limits how many held-out questions are asked (all of them by default),
    `trained_on` how many training questions are used (all of them by default)."""
    phases = Phases()
    started = time.perf_counter()
    model_dir = smollm2_path()
    train_records, held_out = task_records()
    train_records = train_records[:trained_on]
    data_dir = out / "data"
    asked = held_out[:scored]
    questions, references = [question_of(r) for r in asked], [reference_of(r) for r in asked]

    with phases("ask before"):
        before = ask(model_dir, questions, answer_tokens)
    if method == "sft":
        write_jsonl(train_records, data_dir / "train.jsonl")
        write_jsonl(held_out, data_dir / "eval.jsonl")
    else:  # the base model's own replies are the rejected side; the held-out ones were just asked
        with phases("base replies"):
            replies = base_replies(model_dir, [question_of(r) for r in train_records], answer_tokens,
                                   data_dir / "base_replies.json")
        write_jsonl(preference_pairs(train_records, replies), data_dir / "train.jsonl")
        write_jsonl(preference_pairs(asked, before), data_dir / "eval.jsonl")

    config = config_from_dict({
        "model": {"path": str(model_dir)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"), "max_seq_len": 128},
        "train": {"method": method, "epochs": epochs, "max_steps": max_steps, "batch_size": 8,
                  "lr": LEARNING_RATES[method], "warmup_steps": 5, "eval_every": 30, "save_every": 30,
                  "schedule": "cosine"},
        "output": {"dir": str(out / "run")},
    })
    with phases("train"):
        result = train(config, overwrite=overwrite)

    with phases("ask after"):
        after = ask(model_dir, questions, answer_tokens, result.adapter_dir)

    export_report = None
    if export:
        with phases("export"):
            export_report = export_merged(model_dir, result.adapter_dir, out / "merged", dtype="bf16", overwrite=True)

    evals = [r for r in result.history if "eval_rewards/margins" in r]
    summary = {
        "model": model_dir.name, "task": "chatterbot trivia, answers as JSON", "instruction": SYSTEM,
        "method": method, "held_out": len(asked), "steps": result.steps,
        "eval_loss": {"before": result.eval_before, "after": result.eval_after},
        "reward": None if not evals else {
            when: {"margin": row["eval_rewards/margins"], "accuracy": row["eval_rewards/accuracies"]}
            for when, row in (("before", evals[0]), ("after", evals[-1]))},
        "before": score(before, references), "after": score(after, references),
        "answers": [{"question": q, "reference": ref, "before": b, "after": a}
                    for q, ref, b, a in list(zip(questions, references, before, after))[:SHOWN]],
        "phases_s": {**phases.seconds, "total": time.perf_counter() - started},
        "peak_memory": peak_memory_mib(),
        "run_dir": str(result.run_dir),
        "export": None if export_report is None else {
            "out": str(export_report["out"]),
            "logit_rel_error": (export_report.get("verify") or {}).get("logit_rel_error", {})},
    }
    text = format_summary(summary)
    print("\n" + text)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", text + "\n")
    return summary


def _clip(text: str, n: int = 60) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def format_summary(s: dict) -> str:
    """The summary as Markdown: it reads the same in a terminal and in the README."""
    b, a, loss = s["before"], s["after"], s["eval_loss"]
    method = s.get("method", "sft")
    how = "" if method == "sft" else f", {method.upper()} (chosen: the JSON answer; rejected: the base's own reply)"
    lines = [
        f"### qlora_kit demo: {s['model']}, 4-bit NF4, LoRA r16, {s['task']}{how}",
        "",
        f"Instruction (same before and after): `{s['instruction']}`",
        f"Held out: {s['held_out']} questions the model never trained on; {s['steps']} training steps.",
        "",
        "| held-out measure | before | after |",
        "|---|---|---|",
        f"| {LOSS_LABELS[method]} | {loss['before']:.3f} | {loss['after']:.3f} |",
    ]
    if method == "sft":
        lines.append(f"| perplexity | {math.exp(loss['before']):.1f} | {math.exp(loss['after']):.1f} |")
    reward = s.get("reward")
    if reward:
        lines += [f"| reward margin, chosen - rejected | {reward['before']['margin']:.3f} | "
                  f"{reward['after']['margin']:.3f} |",
                  f"| reward accuracy: chosen ahead | {reward['before']['accuracy']:.0%} | "
                  f"{reward['after']['accuracy']:.0%} |"]
    lines += [
        f"| format: reply is exactly {{\"answer\": ...}} | {b['format']:.0%} | {a['format']:.0%} |",
        f"| median answer length, words | {b['words']:g} | {a['words']:g} |",
        f"| accuracy: answer contains the reference | {b['accuracy']:.0%} | {a['accuracy']:.0%} |",
        "",
        f"The first {len(s['answers'])} held-out questions:",
        "",
        "| question | reference | before | after |",
        "|---|---|---|---|",
    ]
    lines += [f"| {_clip(r['question'], 50)} | {_clip(r['reference'], 30)} | {_clip(r['before'])} | {_clip(r['after'])} |"
              for r in s["answers"]]
    times = ", ".join(f"{name} {sec:.0f} s" for name, sec in s["phases_s"].items())
    memory = f"peak RSS {s['peak_memory']['rss_mib']:.0f} MiB"
    if "cuda_mib" in s["peak_memory"]:
        memory += f", peak CUDA {s['peak_memory']['cuda_mib']:.0f} MiB"
    lines += ["", f"Wall time: {times}. Memory: {memory}.", f"Run folder: {s['run_dir']} (adapter/, metrics.jsonl, "
              "loss.png, checkpoints/)."]
    if s["export"]:
        errors = ", ".join(f"{base} {err:.2e}" for base, err in s["export"]["logit_rel_error"].items())
        lines.append(f"Merged bf16 model: {s['export']['out']}" +
                     (f" (relative logit error against the 4-bit model with adapter, by merge base: {errors})"
                      if errors else "") + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", type=Path)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="a few steps and questions only (for tests)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--method", default="sft", choices=sorted(LEARNING_RATES),
                   help="sft (default), or learn the same task from preference pairs with dpo or orpo")
    args = p.parse_args(argv)
    run(args.out, args.epochs, max_steps=6 if args.quick else None, export=not args.no_export,
        answer_tokens=12 if args.quick else 32, scored=SHOWN if args.quick else None, method=args.method,
        trained_on=16 if args.quick else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
