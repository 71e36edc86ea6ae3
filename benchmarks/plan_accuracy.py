"""How close `plan_memory` comes to the peak memory of real training steps on this CPU, per compute dtype.

For each compute dtype (fp32, bf16 and fp16 by default), model size and sequence length, a fresh
child process loads a random-init Llama folder 4-bit (NF4 + double quant) with that compute dtype,
adds LoRA to every linear layer, turns on gradient checkpointing and runs two steps (causal_lm_loss,
backward, optimiser step), as the trainer does. The child resets the kernel's resident-memory
high-water mark (VmHWM) after loading, so the figure is the peak of the training steps, not of the
load. The parent prints one table per dtype, predicted vs measured, and writes JSON.

A dtype this CPU multiplies slowly (emulated: fp16 on most CPUs, bf16 without AVX512-BF16 or AMX)
runs on the smallest model and the two shorter sequences only, unless --full is given: an emulated
16-bit GEMM runs at about 1 GFLOP/s, and the memory it needs does not depend on its speed.

The overhead terms the plan fits (qlora_kit.plan: CPU_INTERPRETER_BYTES, CPU_STEP_RUNTIME_BYTES) are
printed as this run measures them: the resident set before the steps minus the static bytes, and
the step's peak minus the tensors the plan counts for it.

    python benchmarks/plan_accuracy.py [--dtypes fp32,bf16,fp16] [--full] [--json out.json] [--quick]
                                       [--checkpoint-blocks N]
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
# 128 and 512 tokens: the loss (one chunk of logits) is the peak; 2048: the loss runs in 4 chunks
# and, with fp32 compute, a decoder block's backward pass is the peak instead.
SEQ_LENS = (128, 512, 2048)
BATCH = 2
VOCAB = 32000
DTYPES = ("fp32", "bf16", "fp16")
CHECKPOINT: bool | int = True  # --checkpoint-blocks: every block, or the first N
MiB = 2 ** 20


def vm_hwm() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def vm_rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def cpu_kind() -> str:
    """The CPU's model name and the instruction sets that decide which dtypes are fast."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = re.search(r"model name\s*:\s*(.+)", info)
    flag_line = re.search(r"flags\s*:\s*(.+)", info)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    sets = [s for s in ("avx512_bf16", "amx_bf16", "avx512_fp16", "avx512f", "avx2") if s in flags]
    if {"avx512_bf16", "amx_bf16"} & flags:
        kind = "AVX512-BF16"
    else:
        kind = "AVX512" if "avx512f" in flags else "AVX2-only"
    label = f"{name.group(1).strip() if name else 'unknown CPU'}, {os.cpu_count()} cores, {kind} ({' '.join(sets)})"
    # An AVX2-only CPU, stood in for by an AVX512 one told to use AVX2 kernels only: bf16 GEMMs are
    # emulated, as there (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 QLORA_KIT_CPU_BF16=0)
    restricted = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "QLORA_KIT_CPU_BF16")
                  if os.environ.get(k)]
    return label + (f", restricted by {' '.join(restricted)}" if restricted else "")


def fast_dtypes() -> set[str]:
    """Compute dtypes this CPU multiplies at full speed: fp32, and bf16 where 'auto' picks it."""
    import torch

    from qlora_kit.dtypes import fast_dtype

    return {"fp32"} | ({"bf16"} if fast_dtype("cpu") == torch.bfloat16 else set())


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
    from qlora_kit.memory import release_freed_memory

    quant, lora = settings(dtype)
    model, _ = load_model(folder, quant, load_tokenizer=False, progress=False)
    add_lora(model, lora)
    set_gradient_checkpointing(model, CHECKPOINT)
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
        release_freed_memory()  # as the trainer does after each step
    return {"peak_rss": vm_hwm(), "rss_before_steps": rss_before, "seconds": time.perf_counter() - start,
            "compute_dtype": str(model.get_input_embeddings().weight.dtype)}


def predict(folder: Path, seq_len: int, optimizer: str, dtype: str):
    from qlora_kit import plan_memory

    quant, lora = settings(dtype)
    return plan_memory(folder, quant, lora, batch=BATCH, seq_len=seq_len, optimizer=optimizer, device="cpu",
                       gradient_checkpointing=CHECKPOINT)


def measure(folder: Path, hidden: int, seq: int, optimizer: str, dtype: str) -> dict:
    """One child run and its prediction, as a row of the table."""
    from qlora_kit.plan import CPU_STEP_RUNTIME_BYTES

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    blocks = [] if CHECKPOINT is True else ["--checkpoint-blocks", str(CHECKPOINT)]
    out = subprocess.run([sys.executable, __file__, "--optimizer", optimizer, *blocks, "--child", str(folder), str(seq), dtype],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        sys.exit(f"child failed for {dtype}, hidden {hidden}, seq {seq}:\n{out.stderr[-3000:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    plan = predict(folder, seq, optimizer, dtype)
    c = plan.components
    static = c["quantized_weights"] + c["quant_constants"] + c["unquantized_weights"] + c["adapters"]
    step_tensors = c["adapter_grads"] + c["optimizer_state"] + c["activations"] + c["logits_loss"]
    step_pred = step_tensors + CPU_STEP_RUNTIME_BYTES
    step_meas = measured["peak_rss"] - measured["rss_before_steps"]
    return {"dtype": dtype, "hidden": hidden, "seq_len": seq, "batch": BATCH, "optimizer": optimizer,
            "checkpointed_blocks": plan.settings["checkpointed_blocks"],
            "predicted": plan.total, "measured": measured["peak_rss"], "error": plan.total / measured["peak_rss"] - 1,
            "predicted_step": step_pred, "measured_step": step_meas, "step_error": step_pred / step_meas - 1,
            "rss_before_steps": measured["rss_before_steps"], "seconds": measured["seconds"],
            "fitted_interpreter": measured["rss_before_steps"] - static,
            "fitted_step_runtime": step_meas - step_tensors,
            "peak_phase": plan.notes[0], "compute_dtype": measured["compute_dtype"], "components": c}


def summary(rows: list[dict]) -> dict:
    errors = [abs(r["error"]) for r in rows]
    return {"runs": rows, "mean_abs_error": sum(errors) / len(errors), "max_abs_error": max(errors),
            "interpreter_mib": [round(r["fitted_interpreter"] / MiB) for r in rows],
            "step_runtime_mib": [round(r["fitted_step_runtime"] / MiB) for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "qlora_kit_plan_bench"),
                    help="where the random model folders are written (kept for reruns)")
    ap.add_argument("--optimizer", default="paged_adamw_8bit", choices=["paged_adamw_8bit", "adamw"])
    ap.add_argument("--dtypes", default=",".join(DTYPES),
                    help="compute dtypes to measure, comma-separated (fp32, bf16, fp16); each gets its own table")
    ap.add_argument("--full", action="store_true",
                    help="the whole grid for every dtype, also those this CPU emulates (slow: hours for fp16)")
    ap.add_argument("--quick", action="store_true", help="smallest size and the two shorter sequences only")
    ap.add_argument("--checkpoint-blocks", type=int, default=None,
                    help="checkpoint only the first N decoder blocks (0: none; default: every block)")
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "SEQ", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    global CHECKPOINT
    CHECKPOINT = True if args.checkpoint_blocks is None else args.checkpoint_blocks
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.optimizer, args.child[2])))
        return
    from qlora_kit.plan import CPU_INTERPRETER_BYTES, CPU_STEP_RUNTIME_BYTES
    from qlora_kit.dtypes import as_dtype, dtype_name, fast_dtype

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        as_dtype(d)  # a clear error for a misspelt name, before any child runs
    fast = fast_dtypes()
    cpu = cpu_kind()
    print(f"CPU: {cpu}; compute_dtype 'auto' = {dtype_name(fast_dtype('cpu'))}")
    ckpt = "every block checkpointed" if CHECKPOINT is True else f"the first {CHECKPOINT} of 4 blocks checkpointed"
    print(f"batch {BATCH}, NF4 + double quant, LoRA r16 on all linear layers, dropout 0.05, {ckpt}, "
          f"{args.optimizer}; MiB; 'step' = peak minus RSS before the steps")
    results = {}
    for dtype in dtypes:
        quick = args.quick or (dtype not in fast and not args.full)
        sizes = list(SIZES)[:1] if quick else list(SIZES)
        seqs = SEQ_LENS[:2] if quick else SEQ_LENS
        note = "" if not quick or args.quick else " (emulated on this CPU: smallest model, shorter sequences only)"
        print(f"\n{dtype} compute{note}")
        print(f"{'hidden':>6} {'seq':>5} {'predicted':>10} {'measured':>10} {'error':>7}"
              f" {'pred. step':>10} {'meas. step':>10} {'error':>7}  peak")
        rows = []
        for hidden in sizes:
            folder = make_model(Path(args.cache) / f"llama-h{hidden}", hidden)
            for seq in seqs:
                row = measure(folder, hidden, seq, args.optimizer, dtype)
                rows.append(row)
                print(f"{hidden:>6} {seq:>5} {row['predicted'] / MiB:>10.0f} {row['measured'] / MiB:>10.0f}"
                      f" {row['error']:>+7.1%} {row['predicted_step'] / MiB:>10.0f} {row['measured_step'] / MiB:>10.0f}"
                      f" {row['step_error']:>+7.1%}  {row['peak_phase'].removeprefix('peak ')}", flush=True)
        results[dtype] = summary(rows)
        s = results[dtype]
        print(f"{dtype}: mean |error| {s['mean_abs_error']:.1%}, worst {s['max_abs_error']:.1%} over {len(rows)} runs; "
              f"fitted terms as measured here: interpreter {min(s['interpreter_mib'])}-{max(s['interpreter_mib'])} MiB "
              f"(plan {CPU_INTERPRETER_BYTES // MiB}), step runtime {min(s['step_runtime_mib'])}-"
              f"{max(s['step_runtime_mib'])} MiB (plan {CPU_STEP_RUNTIME_BYTES // MiB})")
    print("\nsummary (" + cpu + "):")
    for dtype, s in results.items():
        print(f"  {dtype:>5}: mean |error| {s['mean_abs_error']:.1%}, worst {s['max_abs_error']:.1%} "
              f"over {len(s['runs'])} runs")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "paths": results}, indent=2))


if __name__ == "__main__":
    main()
