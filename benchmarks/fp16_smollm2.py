"""A real fp16 fine-tune: SmolLM2-135M-Instruct (4-bit) on chatterbot trivia, with dynamic loss scaling.

    python benchmarks/fp16_smollm2.py --out runs/fp16 [--steps 20] [--dtype fp16]

fp16 is what `compute_dtype: auto` picks on a T4 or V100 (the Colab free tier). This runs the trainer
as a user would, with the compute dtype forced, and prints each step's loss, whether it was skipped
(gradient overflow) and the loss scale, then the held-out loss before and after. `--dtype bf16` or
`fp32` runs the same job on the other paths for comparison. On a CPU fp16 matrix products are
emulated (far slower than bf16 or fp32), so the default job is small: batch 4, 64 tokens.
Writes OUT/run (the run folder: metrics.jsonl, loss.png, adapter) and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
from pathlib import Path


def cpu_kind() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "CPU")
    return f"{name} ({'AVX512-BF16' if ' avx512_bf16' in flags else 'no AVX512-BF16'})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/fp16"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)

    from qlora_kit import smollm2_path, train
    from qlora_kit.datasets import chatterbot_records, write_jsonl

    records = chatterbot_records(["trivia"])
    random.Random(0).shuffle(records)
    data = args.out / "data"
    write_jsonl(records[26:], data / "train.jsonl")
    write_jsonl(records[:16], data / "eval.jsonl")
    result = train({
        "model": {"path": str(smollm2_path())},
        "quant": {"bits": 4, "compute_dtype": args.dtype},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "max_seq_len": args.seq},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 1e-3, "warmup_steps": 2,
                  "eval_every": args.steps, "save_every": args.steps, "schedule": "cosine"},
        "output": {"dir": str(args.out / "run")},
    }, overwrite=True)
    rows = [r for r in result.history if "loss" in r]
    print(f"\n{cpu_kind()}; compute dtype {args.dtype}; {args.steps} steps of {args.batch} x <= {args.seq} tokens")
    print("| step | loss | skipped | loss scale | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['loss']:.4f} | {r.get('skipped', '-')} | {r.get('loss_scale', '-')} | "
              f"{r['tokens_per_s']:.1f} |")
    skipped = sum(bool(r.get("skipped")) for r in rows)
    print(f"held-out loss {result.eval_before:.4f} -> {result.eval_after:.4f}; skipped steps {skipped} of {len(rows)}; "
          f"wall {result.wall_s:.0f} s")
    summary = {"cpu": cpu_kind(), "dtype": args.dtype, "steps": args.steps, "batch": args.batch, "seq": args.seq,
               "eval_before": result.eval_before, "eval_after": result.eval_after, "skipped": skipped,
               "losses": [r["loss"] for r in rows], "loss_scales": [r.get("loss_scale") for r in rows],
               "wall_s": result.wall_s}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
