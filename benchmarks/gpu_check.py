"""Benchmark: a few qlora_kit training steps on one CUDA GPU, the memory planner's prediction beside them.

    python benchmarks/gpu_check.py --out runs/gpu_check/bench.json [--tests runs/gpu_check/tests.xml]

The model is a random bf16 Llama with TinyLlama-1.1B's widths and 16 of its 22 layers (hidden 2048,
32 heads / 4 KV heads, intermediate 5632, vocab 32000: 0.84B parameters), its weights drawn on the GPU
and written once into the cache folder, plus a word-level tokenizer whose words are the token ids
(benchmarks/e2e_7b.py), so the trainer's real data path turns a JSONL file of random words into
exactly batch x seq random token ids per step.

For each compute dtype (bf16, fp16) a fresh process runs `qlora_kit.train` from a config: NF4 + double
quant, LoRA r16 alpha 32 dropout 0.05 on all linear layers, gradient checkpointing, paged 8-bit AdamW,
batch 4 x 1024 tokens, 6 steps, no evaluation. Measured in that process:

  tokens/s      batch x seq x (steps - 1) / the time of steps 2..N, from the trainer's metrics rows
                (step 1 warms up kernels and allocates the optimiser state). Each step's time ends
                after the loss's .item(), which waits for the GPU, and the paged optimiser synchronises
                after its step, so the rows time what the GPU did.
  peak allocated  torch.cuda.max_memory_allocated over the whole run (load included), after
                reset_peak_memory_stats: the bytes of tensors alive at once.
  reserved + context  max_memory_reserved (what the caching allocator took from the driver) plus the
                CUDA context, estimated at the end of the run as the device's used memory minus what
                torch holds reserved (other processes on the card would count too): about what
                nvidia-smi shows for the process at its peak.

The plan is `qlora_kit.plan_memory` with the run's settings (the line the trainer prints). Its
"framework overhead" line (CUDA context 512 MiB + 20% of the step's transient bytes for allocator
fragmentation) is assumed, not measured, so the plan without it is compared with the peak allocated,
and the whole plan with reserved + context; error = planned / measured - 1.

With --tests (a JUnit XML file from `pytest -m cuda --junitxml=... -o junit_family=xunit1`) the test
outcomes and the figures they record go into the same table (--no-bench: that table alone). Prints one
markdown table, writes JSON to --out (and the table to --table); never asserts on time. Without a GPU
it stops with a message (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

from e2e_7b import token_rows, with_tokenizer, write_data
from export_7b import default_cache

GIB = 2 ** 30
SHAPE = dict(hidden=2048, layers=16, heads=32, kv_heads=4, intermediate=5632, vocab=32000)
BATCH, SEQ, STEPS = 4, 1024, 6
LORA = dict(r=16, alpha=32, dropout=0.05, targets="all-linear")
DTYPES = ("bf16", "fp16")
CHILD_TIMEOUT_S = 90  # per phase; three phases fit the script's 4-minute allowance


# ---------------------------------------------------------------- the model folder and the data

def write_checkpoint(folder: Path, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                     vocab: int, device: str = "cuda", seed: int = 0) -> Path:
    """A random bf16 Llama folder (one safetensors file), weights drawn on `device`; kept once written.

    A GPU draws 0.84B normal numbers in well under a second where two CPU cores take a minute; the
    tensors then pass through host memory (1.7 GB) on their way to the file."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "DONE").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                dtype="bfloat16").save_pretrained(tmp)
    generator = torch.Generator(device=device).manual_seed(seed)

    def rand(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()

    shapes = {  # module -> (out_features, in_features)
        "self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    ones = torch.ones(hidden, dtype=torch.bfloat16)
    tensors = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        tensors.update({f"{prefix}{name}.weight": rand(*shape) for name, shape in shapes.items()})
        tensors[prefix + "input_layernorm.weight"] = ones.clone()
        tensors[prefix + "post_attention_layernorm.weight"] = ones.clone()
    tensors["model.norm.weight"] = ones.clone()
    tensors["lm_head.weight"] = rand(vocab, hidden)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "DONE").write_text("ok\n")
    tmp.rename(folder)
    return folder


def model_folder(root: Path, device: str = "cuda") -> Path:
    """The 1B-shaped checkpoint under `root`, seen through a folder that adds the word-level tokenizer."""
    name = f"llama-h{SHAPE['hidden']}-l{SHAPE['layers']}-kv{SHAPE['kv_heads']}-shaped"
    return with_tokenizer(write_checkpoint(Path(root) / name, **SHAPE, device=device), SHAPE["vocab"])


def write_token_data(path: Path, seq: int, rows: int) -> Path:
    """`rows` lines of seq - 1 random words: the trainer makes each one seq tokens (EOS appended)."""
    return write_data(Path(path), token_rows(SHAPE["vocab"], seq, rows))


def run_config(model: Path, data: Path, run_dir: Path, dtype: str, batch: int = BATCH, seq: int = SEQ,
               steps: int = STEPS) -> dict:
    """The run, as its YAML file would say it."""
    return {
        "model": {"path": str(model)},
        "quant": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": dtype},
        "lora": {**LORA, "dtype": dtype},
        "data": {"train": str(data), "eval_fraction": 0.0, "max_seq_len": seq},
        "train": {"max_steps": steps, "batch_size": batch, "optimizer": "paged_adamw_8bit", "lr": 2e-4,
                  "gradient_checkpointing": True, "eval_every": steps + 1, "save_every": steps,
                  "keep_last": 1, "seed": 0, "device": "cuda"},
        "output": {"dir": str(run_dir)},
    }


# ---------------------------------------------------------------- measuring and planning

def plan_for(raw: dict):
    """The planner's prediction for this run, with the arguments the trainer's own plan line uses."""
    from qlora_kit import plan_memory
    from qlora_kit.config import config_from_dict

    config = config_from_dict(raw)
    t = config.train
    return plan_memory(config.model.path, config.quant.build(), config.lora.build(t.seed), batch=t.batch_size,
                       seq_len=config.data.max_seq_len, gradient_checkpointing=t.gradient_checkpointing,
                       optimizer=t.optimizer, device="cuda", chunk_tokens=t.loss_chunk_tokens)


def measure_run(raw: dict) -> dict:
    """Run qlora_kit.train(raw) in this process and measure it on the GPU (see the module docstring).

    Tensors left by earlier work in the process (a test session) are subtracted: `baseline_*`."""
    import gc

    import torch
    from accelerate.state import AcceleratorState

    from qlora_kit import train

    # accelerate keeps one state per process; one left by a CPU run would put this run on the CPU
    AcceleratorState._reset_state(reset_partial_state=True)
    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    baseline_allocated = torch.cuda.memory_allocated(device)
    baseline_reserved = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = train(raw, progress=False)
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - started
    free, total = torch.cuda.mem_get_info(device)
    context = (total - free) - torch.cuda.memory_reserved(device)
    peak_allocated = torch.cuda.max_memory_allocated(device) - baseline_allocated
    peak_reserved = torch.cuda.max_memory_reserved(device) - baseline_reserved

    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in (json.loads(line) for line in lines if line.strip()) if "loss" in r]
    tokens = raw["train"]["batch_size"] * raw["data"]["max_seq_len"]
    timed = rows[1:] or rows
    seconds = sum(tokens / r["tokens_per_s"] for r in timed)
    return {
        "device": torch.cuda.get_device_name(device), "wall_s": wall, "steps": len(rows),
        "step_s": seconds / len(timed), "tokens_per_s": tokens * len(timed) / seconds,
        "losses": [r["loss"] for r in rows], "peak_allocated": peak_allocated, "peak_reserved": peak_reserved,
        "context": context, "peak_with_context": peak_reserved + context,
        "trainer_mem_mb": [r["mem_mb"] for r in rows], "adapter_dir": str(result.adapter_dir),
        "baseline_allocated": baseline_allocated, "eval_before": result.eval_before, "eval_after": result.eval_after,
    }


def compare(plan, measured: dict) -> dict:
    """The plan against the measurement: tensors against peak allocated, the whole plan against
    reserved + context (the overhead line is the part that models the allocator and the context)."""
    tensors = plan.total - plan.components["overhead"]
    return {"plan_total": plan.total, "plan_tensors": tensors, "plan_overhead": plan.components["overhead"],
            "error_tensors": tensors / measured["peak_allocated"] - 1,
            "error_total": plan.total / measured["peak_with_context"] - 1,
            "components": dict(plan.components)}


# ---------------------------------------------------------------- children

def child(spec_path: str) -> int:
    """One phase in a fresh process (so each run has its own CUDA context and allocator)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    if spec["phase"] == "prepare":
        import torch

        folder = model_folder(Path(spec["cache"]))
        data = write_token_data(Path(spec["data"]), spec["seq"], spec["batch"] * spec["steps"])
        out = {"model": str(folder), "data": str(data), "gpu": torch.cuda.get_device_name(0),
               "capability": list(torch.cuda.get_device_capability(0)),
               "gpu_memory": torch.cuda.get_device_properties(0).total_memory,
               "torch": torch.__version__, "cuda": torch.version.cuda}
    else:
        out = measure_run(spec["config"])
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


def run_child(spec: dict, work: Path, name: str) -> dict:
    """Run one phase; its output goes to work/NAME.log. Returns its result, or {'error': ...}."""
    spec = {**spec, "result": str(work / f"{name}.result.json")}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = work / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    try:
        with open(log, "w") as f:
            code = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                  stdout=f, stderr=subprocess.STDOUT, env=env, timeout=CHILD_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {CHILD_TIMEOUT_S} s (log: {log})"}
    result = Path(spec["result"])
    if code != 0 or not result.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {code} after {time.perf_counter() - started:.0f} s: {tail[0][:200]} (log: {log})"}
    return json.loads(result.read_text())


# ---------------------------------------------------------------- the table

def test_rows(xml_path: Path) -> list[dict]:
    """Outcome, time and recorded figures of every test case in a pytest JUnit XML file."""
    rows = []
    for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
                detail = (node.get("message") or "").strip().splitlines()[0][:160] if node.get("message") else ""
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        rows.append({"name": case.get("name"), "outcome": outcome, "time_s": float(case.get("time") or 0),
                     "figures": props, "detail": detail})
    return rows


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def table(results: dict) -> str:
    m = results.get("machine", {})
    lines = []
    if m:
        lines += [f"GPU: {m.get('gpu', '?')} ({_gib(m['gpu_memory']) if 'gpu_memory' in m else '?'}), torch "
                  f"{m.get('torch', '?')}, CUDA {m.get('cuda', '?')}, bitsandbytes {m.get('bitsandbytes', '?')}, "
                  f"{results.get('date', '')}", ""]
    lines += ["| check | result | figures |", "|---|---|---|"]
    for row in results.get("tests", []):
        figures = "; ".join(f"{k} {v}" for k, v in row["figures"].items())
        if row["detail"]:
            figures = f"{row['detail']}" + (f"; {figures}" if figures else "")
        lines.append(f"| {row['name']} | {row['outcome']} ({row['time_s']:.1f} s) | {figures or '-'} |")
    s = results.get("settings", {})
    for dtype, run in results.get("runs", {}).items():
        what = (f"bench: train 1B-shaped, {dtype}, {s.get('batch')} x {s.get('seq')} tokens, "
                f"{s.get('steps')} steps")
        if "error" in run:
            lines.append(f"| {what} | FAILED | {run['error']} |")
            continue
        c = run["plan"]
        losses = run["losses"]
        lines.append(
            f"| {what} | {run['tokens_per_s']:,.0f} tokens/s | step {run['step_s'] * 1e3:.0f} ms; peak allocated "
            f"{_gib(run['peak_allocated'])}, plan without overhead {_gib(c['plan_tensors'])} "
            f"({_pct(c['error_tensors'])}); reserved + context {_gib(run['peak_with_context'])} (context "
            f"{_gib(run['context'])}), plan {_gib(c['plan_total'])} ({_pct(c['error_total'])}); loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f}; run {run['wall_s']:.0f} s |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def no_gpu_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        build = f"torch {torch.__version__} is a CPU-only build"
    else:
        build = (f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU: check the "
                 "driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
    return (f"no CUDA GPU: {build}. Run this on a machine with an NVIDIA GPU; bash scripts/gpu_check.sh "
            "sets up a CUDA torch and runs the CUDA tests first")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check/bench.json"), help="JSON results")
    parser.add_argument("--tests", type=Path, help="JUnit XML of `pytest -m cuda` to show in the same table")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the 1B-shaped folder is kept")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--no-bench", action="store_true", help="only print the --tests table (no GPU needed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.no_bench:
        results = {"tests": test_rows(args.tests) if args.tests is not None and args.tests.is_file() else [],
                   "date": time.strftime("%Y-%m-%d %H:%M")}
        print(table(results))
        return 0
    problem = no_gpu_reason()  # is_available() does not create a CUDA context in this process
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up)")

    import bitsandbytes

    work = args.out.parent / "bench-work"
    work.mkdir(parents=True, exist_ok=True)
    settings = {"batch": args.batch, "seq": args.seq, "steps": args.steps, "shape": SHAPE, "lora": LORA,
                "quant": "nf4 + double quant", "optimizer": "paged_adamw_8bit", "gradient_checkpointing": True}
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "settings": settings, "runs": {}}
    started = time.perf_counter()
    prepared = run_child({"phase": "prepare", "cache": str(args.cache), "data": str(work / "train.jsonl"),
                          "seq": args.seq, "batch": args.batch, "steps": args.steps}, work, "prepare")
    results["machine"] = {k: prepared.get(k) for k in ("gpu", "capability", "gpu_memory", "torch", "cuda")
                          if k in prepared}
    results["machine"].update(bitsandbytes=bitsandbytes.__version__, host=platform.node(),
                              cpus=os.cpu_count())
    failed = "error" in prepared
    if failed:
        results["runs"] = {d: {"error": "preparing the model folder failed: " + prepared["error"]} for d in args.dtypes}
    else:
        for dtype in args.dtypes:
            raw = run_config(Path(prepared["model"]), Path(prepared["data"]), work / f"run-{dtype}", dtype,
                             args.batch, args.seq, args.steps)
            run = run_child({"phase": "train", "config": raw}, work, f"train-{dtype}")
            if "error" not in run:
                run["plan"] = compare(plan_for(raw), run)
                if not all(math.isfinite(x) for x in run["losses"]):
                    run["note"] = "non-finite loss"
            failed = failed or "error" in run
            results["runs"][dtype] = run
    results["bench_s"] = time.perf_counter() - started
    if args.tests is not None and args.tests.is_file():
        results["tests"] = test_rows(args.tests)
    text = table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    if args.table is not None:
        args.table.write_text(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
