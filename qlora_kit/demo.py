"""The end-to-end demo: fine-tune SmolLM2-135M-Instruct (4-bit) on chatterbot-corpus trivia, on a CPU.

    python -m qlora_kit.demo [--out runs/demo] [--epochs 3] [--quick]

Prints the held-out loss and the model's answers to held-out questions before and after training,
saves the adapter, and exports a merged bf16 model. Everything comes from installed packages.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from .config import config_from_dict
from .datasets import chatterbot_records, write_jsonl
from .generation import generate
from .models import smollm2_path

QUESTIONS_SHOWN = 4


def run(out: Path, epochs: float = 3.0, max_steps: int | None = None, export: bool = True,
        overwrite: bool = True, answer_tokens: int = 32) -> dict:
    from . import load_adapter, load_model
    from .trainer import train

    started = time.time()
    model_dir = smollm2_path()
    records = chatterbot_records(["trivia"])
    random.Random(0).shuffle(records)
    held_out, train_records = records[:26], records[26:]
    data_dir = out / "data"
    write_jsonl(train_records, data_dir / "train.jsonl")
    write_jsonl(held_out, data_dir / "eval.jsonl")
    questions = [r["messages"][0]["content"] for r in held_out[:QUESTIONS_SHOWN]]
    truths = [r["messages"][1]["content"] for r in held_out[:QUESTIONS_SHOWN]]

    base, tok = load_model(model_dir, progress=False)
    before = generate(base, tok, questions, max_new_tokens=answer_tokens)
    del base

    config = config_from_dict({
        "model": {"path": str(model_dir)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"), "max_seq_len": 128},
        "train": {"epochs": epochs, "max_steps": max_steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 5,
                  "eval_every": 30, "save_every": 30, "schedule": "cosine"},
        "output": {"dir": str(out / "run")},
    })
    result = train(config, overwrite=overwrite)

    model, tok = load_model(model_dir, progress=False)
    load_adapter(model, result.adapter_dir)
    after = generate(model, tok, questions, max_new_tokens=answer_tokens)
    del model

    export_report = None
    if export:
        from .export import export_merged
        export_report = export_merged(model_dir, result.adapter_dir, out / "merged", dtype="bf16", overwrite=True)

    summary = {"eval_loss_before": result.eval_before, "eval_loss_after": result.eval_after,
               "steps": result.steps, "train_wall_s": result.wall_s, "total_wall_s": time.time() - started,
               "answers": list(zip(questions, truths, before, after)), "run_dir": str(result.run_dir),
               "export": export_report}
    print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    import math

    print("\n=== qlora_kit demo: SmolLM2-135M-Instruct, 4-bit NF4 base, LoRA r16, chatterbot trivia ===")
    print(f"held-out loss  {s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f}   "
          f"(perplexity {math.exp(s['eval_loss_before']):.1f} -> {math.exp(s['eval_loss_after']):.1f})")
    print(f"{s['steps']} steps, training {s['train_wall_s']:.0f} s, whole demo {s['total_wall_s']:.0f} s")
    for q, truth, b, a in s["answers"]:
        print(f"\nQ: {q}\n   reference: {truth}\n   before:    {b[:160]}\n   after:     {a[:160]}")
    print(f"\nrun folder: {s['run_dir']} (adapter/, metrics.jsonl, loss.png, checkpoints/)")
    rep = s.get("export")
    if rep:
        errors = (rep.get("verify") or {}).get("logit_rel_error", {})
        shown = ", ".join(f"{base} {err:.2e}" for base, err in errors.items())
        print(f"merged bf16 model: {rep['out']}" + (f" (relative logit error vs the 4-bit model with adapter, "
                                                   f"by merge base: {shown}; see report.txt)" if shown else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", type=Path)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    p.add_argument("--no-export", action="store_true")
    args = p.parse_args(argv)
    run(args.out, args.epochs, max_steps=6 if args.quick else None, export=not args.no_export,
        answer_tokens=12 if args.quick else 32)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
