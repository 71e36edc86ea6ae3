"""What each LoRA init does on SmolLM2-135M-Instruct with a 4-bit NF4 base, on this machine.

    python benchmarks/inits.py [--steps 30] [--r 16] [--out runs/bench-inits] [--layer-7b]

For each init (default, orthogonal, svd, loftq) it prints:
  - init time (add_lora on the loaded 4-bit model, all 210 linear layers);
  - step-0 relative logit error against the full-precision (fp32, unquantised) model on held-out
    chatterbot trivia prompts: how far the quantised model + fresh adapter starts from the original;
  - held-out loss before and after the same short fine-tune (qlora_kit.train, same data, seed, steps).
--layer-7b also times each init on one 4096 x 11008 (Llama-7B MLP-shaped) random layer.
Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from qlora_kit import LoraConfig, QuantConfig, add_lora, load_model
from qlora_kit.config import config_from_dict
from qlora_kit.datasets import chatterbot_records, write_jsonl
from qlora_kit.inits import loftq_init, orthogonal_a, svd_init
from qlora_kit.lora import INITS
from qlora_kit.models import smollm2_path
from qlora_kit.trainer import train


def held_out_batch(tokenizer, records, n=16, max_len=64) -> dict:
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records[:n]]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return out[batch["attention_mask"].bool()]


def step0_errors(model_dir: Path, batch, r: int, iters: int) -> dict:
    full, _ = load_model(model_dir, quant=None, dtype="fp32", load_tokenizer=False, progress=False)
    reference = logits(full, batch)
    del full
    rows = {}
    for init in INITS:
        model, _ = load_model(model_dir, quant=QuantConfig(), load_tokenizer=False, progress=False)
        started = time.perf_counter()
        add_lora(model, LoraConfig(r=r, alpha=2 * r, init=init, init_iters=iters, seed=0))
        seconds = time.perf_counter() - started
        model.eval()  # new adapter layers start in train mode: no dropout when measuring
        err = float(torch.linalg.vector_norm(logits(model, batch) - reference) / torch.linalg.vector_norm(reference))
        rows[init] = {"init_s": seconds, "step0_logit_rel_error": err}
        print(f"{init:10s} init {seconds:6.1f} s   step-0 relative logit error vs fp32 model {err:.4f}", flush=True)
        del model
    return rows


def fine_tune(model_dir: Path, data_dir: Path, out: Path, init: str, r: int, iters: int, steps: int) -> dict:
    config = config_from_dict({
        "model": {"path": str(model_dir)},
        "lora": {"r": r, "alpha": 2 * r, "dropout": 0.05, "init": init, "init_iters": iters},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"), "max_seq_len": 96},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 3, "optimizer": "adamw",
                  "eval_every": steps, "save_every": steps, "schedule": "cosine", "seed": 0},
        "output": {"dir": str(out / init)},
    })
    result = train(config, overwrite=True, progress=False, export=False)
    print(f"{init:10s} held-out loss {result.eval_before:.3f} -> {result.eval_after:.3f} after {steps} steps "
          f"({result.wall_s:.0f} s)", flush=True)
    return {"eval_before": result.eval_before, "eval_after": result.eval_after, "train_s": result.wall_s,
            "adapter": str(result.adapter_dir)}


def time_7b_layer(r: int, iters: int) -> dict:
    """Seconds per init on one 4096 x 11008 layer (the factors only; loading is not counted)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 11008, generator=g) * 0.02
    quant = QuantConfig().resolved("cpu")
    scale = 2.0
    out = {}
    for name, fn in [("orthogonal", lambda: orthogonal_a(r, 11008, g)), ("svd", lambda: svd_init(w, r, scale, g)),
                     ("loftq", lambda: loftq_init(w, r, scale, quant, iters, g))]:
        started = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - started
        print(f"4096x11008 layer: {name:10s} {out[name]:.2f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--iters", type=int, default=1, help="LoftQ rounds")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--layer-7b", action="store_true")
    p.add_argument("--no-train", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-inits-"))

    model_dir = smollm2_path()
    records = chatterbot_records(["trivia"])
    random.Random(0).shuffle(records)
    held_out, train_records = records[:26], records[26:]
    write_jsonl(train_records, out / "data" / "train.jsonl")
    write_jsonl(held_out, out / "data" / "eval.jsonl")
    _, tokenizer = load_model(model_dir, quant=QuantConfig(), progress=False)
    batch = held_out_batch(tokenizer, held_out)

    results = {"r": args.r, "loftq_iters": args.iters, "steps": args.steps, "step0": step0_errors(model_dir, batch, args.r, args.iters)}
    if not args.no_train:
        results["fine_tune"] = {init: fine_tune(model_dir, out / "data", out / "runs", init, args.r, args.iters, args.steps)
                                for init in INITS}
    if args.layer_7b:
        results["layer_7b_s"] = time_7b_layer(args.r, args.iters)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
