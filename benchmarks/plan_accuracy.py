"""How close `plan_memory` comes to the peak memory of real training steps on this CPU.

For each model size and sequence length, a fresh child process loads a random-init Llama folder
4-bit (NF4 + double quant, fp32 compute by default), adds LoRA to every linear layer, turns on gradient checkpointing and
runs two steps (causal_lm_loss, backward, optimiser step), as the trainer does. The child resets
the kernel's resident-memory high-water mark (VmHWM) after loading, so the figure is the peak of
the training steps, not of the load. The parent prints predicted vs measured and writes JSON.

    python benchmarks/plan_accuracy.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # hidden -> (intermediate, layers, heads, kv heads); vocab 32000 throughout
    512: (1408, 4, 8, 2),
    1024: (2816, 4, 16, 4),
    1536: (4096, 4, 24, 8),
}
SEQ_LENS = (128, 512)
BATCH = 2
VOCAB = 32000


def vm_hwm() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def vm_rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def make_model(folder: Path, hidden: int) -> Path:
    """A random bf16 Llama folder of the given size (written once, reused)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    inter, layers, heads, kv = SIZES[hidden]
    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv, vocab_size=VOCAB,
                                  max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def settings(dtype: str):
    from qlora_kit import LoraConfig, QuantConfig

    return QuantConfig(compute_dtype=dtype), LoraConfig(r=16, alpha=32, dropout=0.05, dtype=dtype)


def child(folder: str, seq_len: int, optimizer: str, dtype: str) -> dict:
    """Run in a fresh process: two real training steps, peak RSS measured around them."""
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    from qlora_kit import add_lora, load_model, set_gradient_checkpointing
    from qlora_kit.losses import causal_lm_loss

    quant, lora = settings(dtype)
    model, _ = load_model(folder, quant, load_tokenizer=False, progress=False)
    add_lora(model, lora)
    set_gradient_checkpointing(model, True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, seq_len))
    rss_before = vm_rss()
    reset_hwm()
    start = time.perf_counter()
    for _ in range(2):
        loss, _ = causal_lm_loss(model, ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"peak_rss": vm_hwm(), "rss_before_steps": rss_before, "seconds": time.perf_counter() - start}


def predict(folder: Path, seq_len: int, optimizer: str, dtype: str):
    from qlora_kit import plan_memory

    quant, lora = settings(dtype)
    return plan_memory(folder, quant, lora, batch=BATCH, seq_len=seq_len, optimizer=optimizer, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "qlora_kit_plan_bench"),
                    help="where the random model folders are written (kept for reruns)")
    ap.add_argument("--optimizer", default="paged_adamw_8bit", choices=["paged_adamw_8bit", "adamw"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="compute dtype; fp32 by default because CPUs without AVX512-BF16 run bf16 matmuls "
                         "hundreds of times slower (the planner models both)")
    ap.add_argument("--quick", action="store_true", help="smallest size only")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.optimizer, args.dtype)))
        return

    rows = []
    sizes = list(SIZES)[:1] if args.quick else list(SIZES)
    print(f"{'hidden':>6} {'seq':>5} {'batch':>5} {'predicted':>10} {'measured':>10} {'error':>7}"
          f" {'pred. step':>10} {'meas. step':>10} {'error':>7}   (MiB; 'step' = peak minus RSS before the steps)")
    for hidden in sizes:
        folder = make_model(Path(args.cache) / f"llama-h{hidden}", hidden)
        for seq in SEQ_LENS:
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            out = subprocess.run([sys.executable, __file__, "--optimizer", args.optimizer, "--dtype", args.dtype,
                                  "--child", str(folder), str(seq)],
                                 capture_output=True, text=True, env=env, check=False)
            if out.returncode:
                sys.exit(f"child failed for hidden {hidden}, seq {seq}:\n{out.stderr[-3000:]}")
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            plan = predict(folder, seq, args.optimizer, args.dtype)
            c = plan.components
            step_pred = c["adapter_grads"] + c["optimizer_state"] + c["activations"] + c["logits_loss"]
            step_meas = measured["peak_rss"] - measured["rss_before_steps"]
            row = {"hidden": hidden, "seq_len": seq, "batch": BATCH, "optimizer": args.optimizer, "dtype": args.dtype,
                   "predicted": plan.total, "measured": measured["peak_rss"],
                   "error": plan.total / measured["peak_rss"] - 1,
                   "predicted_step": step_pred, "measured_step": step_meas, "step_error": step_pred / step_meas - 1,
                   "rss_before_steps": measured["rss_before_steps"], "seconds": measured["seconds"],
                   "components": c}
            rows.append(row)
            print(f"{hidden:>6} {seq:>5} {BATCH:>5} {plan.total / 2**20:>10.0f} {measured['peak_rss'] / 2**20:>10.0f}"
                  f" {row['error']:>+7.1%} {step_pred / 2**20:>10.0f} {step_meas / 2**20:>10.0f} {row['step_error']:>+7.1%}",
                  flush=True)
    worst = max(abs(r["error"]) for r in rows)
    mean = sum(abs(r["error"]) for r in rows) / len(rows)
    print(f"total peak RSS: mean |error| {mean:.1%}, worst {worst:.1%} over {len(rows)} runs")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "mean_abs_error": mean, "max_abs_error": worst}, indent=2))


if __name__ == "__main__":
    main()
