"""Benchmark: a Llama-2-7B-shaped QLoRA run end to end on a CPU, every phase's memory planned first.

    python benchmarks/e2e_7b.py --preset 7b --out runs/e2e-7b          # the whole run (hours on 2 cores)
    python benchmarks/e2e_7b.py --preset small --out /tmp/e2e --seq 128 # a check in a few minutes

Each phase runs in a fresh child process; its wall time and peak RSS (the child's own ru_maxrss, from
os.wait4) are recorded, and the checkpoint's pages are evicted from the page cache before it starts,
so every load reads from disk. Beside the peak: its anonymous and file-backed parts (RssAnon, RssFile)
at the watchdog's highest sample, and both again when the phase's work has returned ("end"): file
pages are the checkpoint's mapped pages, which the kernel can drop, anonymous ones are the model,
activations and the interpreter.

  ours/load    qlora_kit.load_model, NF4 + double quant, compute dtype --compute-dtype ('auto').
  ours/train   qlora_kit.train from a config: batch 1 x --seq tokens, LoRA r16 alpha 32 dropout 0.05 on
               all linear layers, gradient checkpointing, paged 8-bit AdamW, --steps steps, no
               evaluation; ends by saving a checkpoint and the adapter (the "save" figures).
  ours/export  qlora_kit.export_merged into a bf16 folder (streaming; merge into the dequantised base;
               no verification, which would load the whole model).
  ref/load, ref/train, ref/merge: the usual recipe. transformers BitsAndBytesConfig(load_in_4bit, nf4,
               double quant), peft LoraConfig(r16, alpha 32, dropout 0.05, the seven projections),
               prepare_model_for_kbit_training, non-reentrant gradient checkpointing, bitsandbytes
               paged 8-bit AdamW, the same token ids; merging by 4-bit load, dequantize(),
               merge_and_unload(), save_pretrained() in bf16.

The model is the random bf16 checkpoint export_7b.py writes (cached and reused), seen through a folder
of links that adds a word-level tokenizer whose words are the 32000 ids, so training takes the
trainer's real data path: a JSONL file of seeded random words becomes random token ids.

Predictions, printed before each of our phases and compared with the measured peak afterwards
(error = planned / measured - 1, so + means the plan was above the measurement):
  ours/train   qlora_kit.plan_memory with the run's settings (the line the trainer prints).
  ours/load    the plan's exact static bytes (quantised weights, constants, unquantised weights) and
               its CPU interpreter term, plus the loader's transient, which the planner does not model:
               the largest shard's mapped pages and the temporaries of quantising the largest weight
               (see predict_load). The interpreter term is the planner's training-time figure (warmed
               kernels, accelerate); a bare load's imports take less, reported as "RSS after imports".
  ours/export  not predicted (the planner plans training).

Compute dtype: on a CPU without AVX512-BF16/AMX a bf16 matmul is emulated and >100x slower than fp32,
so our 'auto' and the reference's default (--ref-compute-dtype) are fp32 on such machines, bf16 on
those with it. --compute-dtype float32 / bfloat16 forces our path either way (the plan follows).

GEMM floor: with frozen base weights and per-block checkpointing a step multiplies by every linear
weight three times (forward, recomputed forward, input gradient), 6 FLOPs per weight and token in
all; the floor is 6 x (linear weights, head and adapters included) x tokens / the fp32 (compute
dtype) GEMM rate measured in this run. Attention's own matmuls are left out (2% at seq 512).

Every child runs under a watchdog in this process that reads its VmRSS every 0.5 s and kills it
above --rss-cap-gib; reference children are also stopped after --ref-timeout seconds. A stopped
phase's figure is how far it got ("killed at X GiB RSS after Y s").
Writes OUT/results.json and OUT/e2e.png and prints a table; never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from export_7b import GIB, LLAMA2_7B, PROJECTIONS, default_cache, evict, write_adapter, write_checkpoint

PRESETS = {
    "small": dict(hidden=512, layers=4, heads=8, intermediate=1376, vocab=32000),
    "7b": LLAMA2_7B,
    "13b": dict(hidden=5120, layers=40, heads=40, intermediate=13824, vocab=32000),
}
FOLDERS = {"7b": "llama2-7b-shaped", "13b": "llama2-13b-shaped"}
OURS = ("ours-load", "ours-train", "ours-export")
REFERENCE = ("ref-load", "ref-train", "ref-merge")
PHASES = OURS + REFERENCE
LORA = dict(r=16, alpha=32, dropout=0.05)
BATCH = 1
SEED = 0


# ---------------------------------------------------------------- the model folder and the data

def checkpoint_folder(cache: Path, preset: str) -> Path:
    shape = PRESETS[preset]
    name = FOLDERS.get(preset) or f"llama-h{shape['hidden']}-l{shape['layers']}-shaped"
    return write_checkpoint(cache / name, **shape)


def with_tokenizer(checkpoint: Path, vocab: int) -> Path:
    """A folder of links to the checkpoint's files plus a word-level tokenizer over its vocabulary
    ('t3' .. 't{vocab-1}'; 0-2 are unk, bos, eos), so the trainer can read text. Built once."""
    folder = checkpoint.with_name(checkpoint.name + "-tokenized")
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.name != "DONE":
            (tmp / f.name).symlink_to(f.resolve())
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def token_rows(vocab: int, seq: int, rows: int, seed: int = SEED) -> list[list[int]]:
    """`rows` sequences of seq - 1 random ids and EOS (2): what the trainer makes of the JSONL text."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(seq - 1)] + [2] for _ in range(rows)]


def write_data(path: Path, rows: list[list[int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": " ".join(f"t{i}" for i in ids[:-1])}) + "\n" for ids in rows))
    return path


def run_config(spec: dict) -> dict:
    """The run, as the YAML file would say it."""
    return {
        "model": {"path": spec["model"]},
        "quant": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": spec["compute_dtype"]},
        "lora": {**LORA, "targets": "all-linear"},
        "data": {"train": spec["data"], "eval_fraction": 0.0, "max_seq_len": spec["seq"]},
        "train": {"max_steps": spec["steps"], "batch_size": BATCH, "optimizer": "paged_adamw_8bit",
                  "gradient_checkpointing": True, "eval_every": spec["steps"] + 1, "save_every": spec["steps"],
                  "keep_last": 1, "seed": SEED, "device": "cpu"},
        "output": {"dir": spec["run_dir"]},
    }


# ---------------------------------------------------------------- predictions

def plan(spec: dict):
    from qlora_kit import LoraConfig, QuantConfig, plan_memory

    quant = QuantConfig(compute_dtype=spec.get("compute_dtype", "auto"))
    return plan_memory(spec["model"], quant, LoraConfig(**LORA), batch=BATCH, seq_len=spec["seq"],
                       gradient_checkpointing=True, optimizer="paged_adamw_8bit", device="cpu")


def predict_load(memory_plan, folder: Path) -> dict:
    """Peak RSS of load_model: what the plan says stays (exact) plus the loader's transient.

    The loader reads one shard at a time through a memory map (its pages count as resident until the
    shard is closed) and quantises one weight at a time: the weight cast to the compute dtype,
    bitsandbytes' CPU quantiser's fp32 copy (none when that is the compute dtype), then its scaled
    blocks and int32 codes (4 + 4 bytes per weight) and the uint8 codes with their packed halves
    (2 bytes), next to the bf16 tensor read (2 bytes). The quantiser's part runs over slices of at
    most QUANT_CHUNK weights (qlora_kit.quant), the read tensor and its cast over the whole weight."""
    from qlora_kit.plan import CPU_INTERPRETER_BYTES
    from qlora_kit.quant import QUANT_CHUNK
    from qlora_kit.shapes import resolve_shape

    c = memory_plan.components
    shape = resolve_shape(folder)
    cb = 4 if memory_plan.settings["quant"]["compute_dtype"] == "float32" else 2
    largest = max(a * b for _, a, b, _ in shape.linears())
    quantiser = largest * (2 + cb) + min(largest, QUANT_CHUNK) * ((0 if cb == 4 else 4) + 4 + 4 + 2)
    shard = max(f.stat().st_size for f in folder.glob("*.safetensors"))
    parts = {"static": c["quantized_weights"] + c["quant_constants"] + c["unquantized_weights"],
             "interpreter": CPU_INTERPRETER_BYTES, "shard_pages": shard, "quantiser": quantiser}
    return {"total": sum(parts.values()), "parts": parts}


def linear_weights(folder: Path, trainable: int) -> int:
    """Weights a step multiplies by: every decoder linear layer, the output head and the adapters."""
    from qlora_kit.shapes import resolve_shape

    shape = resolve_shape(folder)
    return shape.layers * sum(a * b for _, a, b, _ in shape.linears()) + shape.vocab * shape.hidden + trainable


# ---------------------------------------------------------------- children (one phase each)

def child_ours_load(spec: dict) -> dict:
    import resource

    import bitsandbytes  # noqa: F401  (imported before the load, so that RSS after imports is known)
    import transformers  # noqa: F401
    from qlora_kit import QuantConfig, load_model
    from qlora_kit.record import record_of

    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    model, _ = load_model(spec["model"], quant=QuantConfig(compute_dtype=spec["compute_dtype"]),
                          load_tokenizer=False, progress=False)
    return {"load_s": time.perf_counter() - start, "compute_dtype": str(record_of(model).quant.compute_dtype),
            "rss_after_imports": imported, **rss_parts("self", "end")}


def child_ours_train(spec: dict) -> dict:
    from qlora_kit import train
    from qlora_kit.dtypes import resolve_dtype

    result = train(run_config(spec), overwrite=True, progress=False)
    end = rss_parts("self", "end")
    run = Path(spec["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens = BATCH * spec["seq"]
    written = [f for d in (run / "checkpoints", result.adapter_dir) for f in d.rglob("*") if f.is_file()]
    adapter = sum(f.stat().st_size for f in result.adapter_dir.iterdir())
    return {"compute_dtype": str(resolve_dtype(spec["compute_dtype"], "cpu")), "train_wall_s": result.wall_s,
            "step_s": [tokens / r["tokens_per_s"] for r in rows], "loss": [r["loss"] for r in rows],
            "step_rss_mib": [r["mem_mb"] for r in rows], "adapter_bytes": adapter,
            # from the last metrics row to the last file written: the final checkpoint and the adapter
            "save_s": max(f.stat().st_mtime for f in written) - (run / "metrics.jsonl").stat().st_mtime, **end}


def child_ours_export(spec: dict) -> dict:
    from qlora_kit import export_merged

    report = export_merged(spec["model"], spec["adapter"], spec["export_dir"], dtype="bf16",
                           merge_into="dequantized", verify=False, overwrite=True, progress=False)
    return {"out_bytes": report["out_bytes"], "merge_s": report["times_s"]["merge"]}


def _ref_load(spec: dict, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, dtype_name)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=q, device_map="cpu", dtype=dtype)


def child_ref_load(spec: dict) -> dict:
    start = time.perf_counter()
    _ref_load(spec, spec["ref_dtype"])
    return {"load_s": time.perf_counter() - start, "compute_dtype": spec["ref_dtype"]}


def child_ref_train(spec: dict) -> dict:
    import warnings

    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    start = time.perf_counter()
    model = _ref_load(spec, spec["ref_dtype"])
    load_s = time.perf_counter() - start
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], task_type="CAUSAL_LM",
                      target_modules=[m.rsplit(".", 1)[1] for m in PROJECTIONS])
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4) if spec["ref_optimizer"] == "paged_adamw_8bit" \
        else torch.optim.AdamW(params, lr=2e-4)
    model.train()
    torch.manual_seed(SEED)
    step_s, losses = [], []
    for ids in token_rows(spec["vocab"], spec["seq"], spec["steps"] * BATCH):   # BATCH is 1
        tick = time.perf_counter()
        x = torch.tensor([ids])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - tick)
        losses.append(loss.item())
    return {"load_s": load_s, "step_s": step_s, "loss": losses, "compute_dtype": spec["ref_dtype"],
            "optimizer": spec["ref_optimizer"], "trainable": sum(p.numel() for p in params)}


def child_ref_merge(spec: dict) -> dict:
    from peft import PeftModel

    model = _ref_load(spec, "bfloat16").dequantize()
    model = PeftModel.from_pretrained(model, spec["adapter"]).merge_and_unload()
    model.save_pretrained(spec["merge_dir"], safe_serialization=True)
    return {"out_bytes": sum(f.stat().st_size for f in Path(spec["merge_dir"]).glob("*.safetensors"))}


def child_gemm(spec: dict) -> dict:
    """FLOP/s of a square matmul in each dtype, the size grown until one takes 0.2 s (at most 2048)."""
    import torch

    rates = {}
    for name in spec["gemm_dtypes"]:
        dtype, n = getattr(torch, name), 256
        while True:
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            a @ b
            tick = time.perf_counter()
            a @ b
            once = time.perf_counter() - tick
            if once > 0.2 or n >= 2048:
                break
            n *= 2
        reps = max(1, int(1.0 / once))
        tick = time.perf_counter()
        for _ in range(reps):
            a @ b
        rates[name] = {"n": n, "flops": 2 * n ** 3 * reps / (time.perf_counter() - tick)}
    return rates


def child_prepare(spec: dict) -> dict:
    """Everything that needs torch before the phases: the checkpoint, its tokenized view, a random adapter
    when none will be trained, the plan and the load prediction, and the machine's fast dtype."""
    import psutil

    from qlora_kit.dtypes import fast_dtype, resolve_dtype

    shape = PRESETS[spec["preset"]]
    cache = Path(spec["cache"])
    checkpoint = checkpoint_folder(cache, spec["preset"])
    model = with_tokenizer(checkpoint, shape["vocab"])
    adapter = Path(spec["run_dir"]) / "adapter"
    if spec["random_adapter"]:   # export_7b.py's adapter for the same checkpoint
        adapter = write_adapter(cache / f"{checkpoint.name}-adapter-r16", shape["hidden"], shape["layers"],
                                shape["intermediate"])
    memory_plan = plan({**spec, "model": str(model)})
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"model": str(model), "adapter": str(adapter), "plan": memory_plan.to_dict(),
            "compute_dtype": str(resolve_dtype(spec["compute_dtype"], "cpu")).removeprefix("torch."),
            "plan_summary": memory_plan.summary(), "load_prediction": predict_load(memory_plan, model),
            "linear_weights": linear_weights(model, memory_plan.trainable_parameters),
            "machine": {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
                        "fast_dtype": str(fast_dtype("cpu")).removeprefix("torch.")}}


CHILDREN = {"prepare": child_prepare, "gemm": child_gemm,
            "ours-load": child_ours_load, "ours-train": child_ours_train, "ours-export": child_ours_export,
            "ref-load": child_ref_load, "ref-train": child_ref_train, "ref-merge": child_ref_merge}


def child_main(phase: str, spec_path: str) -> None:
    import logging
    import warnings

    import torch

    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    result = CHILDREN[phase](spec)
    # The kernel's own high-water mark of this process, to cross-check ru_maxrss (which also counts
    # whatever the parent had resident when it spawned us: the parent stays small for that reason).
    status = Path("/proc/self/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    result["vm_hwm"] = int(hwm.split()[1]) * 1024
    Path(spec["results_dir"], f"{phase}.json").write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------- the parent: measuring children

def rss_parts(pid: int | str, suffix: str = "") -> dict:
    """VmRSS, RssAnon and RssFile of a process in bytes (empty once it has gone); keys get `suffix`."""
    names = {"VmRSS:": "rss", "RssAnon:": "rss_anon", "RssFile:": "rss_file"}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {names[f[0]] + (f"_{suffix}" if suffix else ""): int(f[1]) * 1024
            for f in (line.split() for line in lines) if f and f[0] in names}


def measure(phase: str, spec: dict, spec_path: Path, cap_bytes: int, timeout: float | None) -> dict:
    """Run one phase in a child under the watchdog; wall time, peak RSS and what the child reported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    log_path = Path(spec["results_dir"]) / f"{phase}.log"
    result_path = Path(spec["results_dir"]) / f"{phase}.json"
    result_path.unlink(missing_ok=True)
    stop, seen = threading.Event(), {"max_rss": 0, "at_max": {}, "killed": None}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, __file__, "--child", phase, str(spec_path)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)

    def watch() -> None:
        while not stop.wait(0.5):
            parts = rss_parts(child.pid)
            rss = parts.get("rss", 0)
            if rss > seen["max_rss"]:
                seen["max_rss"], seen["at_max"] = rss, parts
            over = rss > cap_bytes
            late = timeout is not None and time.perf_counter() - start > timeout
            if (over or late) and not stop.is_set():
                seen["killed"] = "rss_cap" if over else "timeout"
                os.kill(child.pid, signal.SIGKILL)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(child.pid, 0)
    stop.set()
    watcher.join()
    child.returncode = code = os.waitstatus_to_exitcode(status)
    out = {"wall_s": round(time.perf_counter() - start, 2),
           "peak_rss": max(usage.ru_maxrss * 1024, seen["max_rss"]), "status": "ok",
           **{f"peak_{k}": v for k, v in seen["at_max"].items() if k != "rss"}}
    if seen["killed"]:
        out["status"] = seen["killed"]
    elif code != 0:
        out["status"] = "failed"
        out["log_tail"] = log_path.read_text()[-3000:]
    elif result_path.is_file():
        out.update(json.loads(result_path.read_text()))
    return out


def describe(phase: str, r: dict) -> str:
    gib = r["peak_rss"] / GIB
    if r["status"] == "rss_cap":
        return f"{phase}: killed at {gib:.2f} GiB RSS after {r['wall_s']:.0f} s (cap)"
    if r["status"] == "timeout":
        return f"{phase}: timed out after {r['wall_s']:.0f} s, at {gib:.2f} GiB RSS"
    if r["status"] == "failed":
        return f"{phase}: FAILED after {r['wall_s']:.0f} s at {gib:.2f} GiB RSS:\n{r['log_tail'][-1500:]}"
    line = f"{phase}: peak RSS {gib:.2f} GiB, {r['wall_s']:.1f} s"
    line += "".join(f"; {label} {r[k] / GIB:.2f} GiB" for k, label in RSS_LABELS.items() if k in r)
    if "predicted" in r:
        line += f"; planned {r['predicted'] / GIB:.2f} GiB, error {r['error']:+.1%}"
    if "rss_after_imports" in r:
        line += f"; RSS after imports {r['rss_after_imports'] / GIB:.2f} GiB"
    if "step_s" in r:
        line += f"; {r['s_per_step']:.2f} s/step"
        if "floor_ratio" in r:
            line += f" ({r['floor_ratio']:.2f}x the GEMM floor)"
        line += f"; loss {r['loss'][0]:.4f} -> {r['loss'][-1]:.4f}"
    if "adapter_bytes" in r:
        line += f"; checkpoint + adapter ({r['adapter_bytes'] / 2**20:.1f} MiB) written in {r['save_s']:.1f} s"
    if "out_bytes" in r:
        line += f"; wrote {r['out_bytes'] / GIB:.2f} GiB"
    return line


# ---------------------------------------------------------------- report: table and figure

RSS_LABELS = {"peak_rss_anon": "RssAnon at peak", "peak_rss_file": "RssFile at peak",
              "rss_anon_end": "RssAnon at end", "rss_file_end": "RssFile at end"}


def table(results: dict) -> str:
    """One row per phase: predicted and measured peak (GiB), error, the peak's anonymous / file-backed
    parts and the same at the phase's end (GiB), wall time, s/step, GEMM-floor ratio."""
    head = ["phase", "predicted GiB", "measured GiB", "error", "anon/file at peak", "anon/file at end",
            "wall s", "s/step", "x floor", "note"]

    def split(r: dict, anon: str, file: str) -> str:
        return f"{r[anon] / GIB:.2f}/{r[file] / GIB:.2f}" if anon in r and file in r else "-"

    rows = [head]
    for phase, r in results["phases"].items():
        note = {"ok": "", "rss_cap": "killed at RSS cap", "timeout": "timed out", "failed": "failed"}[r["status"]]
        if r["status"] == "ok" and "compute_dtype" in r:
            note = r["compute_dtype"].removeprefix("torch.")
        if r["status"] == "ok" and "adapter_bytes" in r:
            note += f"; saved {r['adapter_bytes'] / 2**20:.1f} MiB adapter in {r['save_s']:.1f} s"
        rows.append([phase.replace("-", "/", 1),
                     f"{r['predicted'] / GIB:.2f}" if "predicted" in r else "-",
                     ("~" if r["status"] != "ok" else "") + f"{r['peak_rss'] / GIB:.2f}",
                     f"{r['error']:+.1%}" if "error" in r else "-",
                     split(r, "peak_rss_anon", "peak_rss_file"), split(r, "rss_anon_end", "rss_file_end"),
                     f"{r['wall_s']:.1f}",
                     f"{r['s_per_step']:.2f}" if "s_per_step" in r else "-",
                     f"{r['floor_ratio']:.2f}" if "floor_ratio" in r else "-", note])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if 0 < i < len(head) - 1 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join(line(row) for row in rows)


def plot(results: dict, out: Path) -> None:
    """Bars per phase: our planned and measured peak RSS beside the usual recipe's (cross-hatched where
    it was stopped: the bar is how far it had got)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    phases = results["phases"]
    groups = [("load", "ours-load", "ref-load"), ("train", "ours-train", "ref-train"),
              ("export / merge", "ours-export", "ref-merge")]
    groups = [g for g in groups if g[1] in phases or g[2] in phases]
    kinds = {"planned": ("ours, planned", "#9ecae1", "//"), "ours": ("ours, measured", "#3182bd", None),
             "ref": ("usual recipe, measured", "#e6550d", None)}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width, top = 0.26, 0.0
    for x, (_, ours, ref) in enumerate(groups):
        bars = [(-width, "planned", phases.get(ours, {}).get("predicted"), "ok"),
                (0, "ours", phases.get(ours, {}).get("peak_rss"), phases.get(ours, {}).get("status")),
                (width, "ref", phases.get(ref, {}).get("peak_rss"), phases.get(ref, {}).get("status"))]
        for dx, kind, value, status in bars:
            if value is None:
                continue
            _, color, hatch = kinds[kind]
            gib = value / GIB
            top = max(top, gib)
            ax.bar(x + dx, gib, width, color=color, hatch=hatch if status == "ok" else "xx", edgecolor="black",
                   linewidth=0.5)
            text = {"rss_cap": "killed", "timeout": "timed out", "failed": "failed"}.get(status, "")
            ax.text(x + dx, gib, f"{gib:.2f}" + (f"\n{text}" if text else ""), ha="center", va="bottom", fontsize=8)
    s = results["settings"]
    cap = s["rss_cap_gib"]
    if top > cap / 3:   # else the line only squashes the bars
        ax.axhline(cap, color="grey", ls="--", lw=1)
        ax.text(len(groups) - 0.5, cap, f"RSS cap {cap:g} GiB", ha="right", va="bottom", fontsize=8, color="grey")
        top = max(top, cap)
    handles = [Patch(facecolor=c, hatch=h, edgecolor="black", linewidth=0.5, label=label)
               for label, c, h in kinds.values()]
    if any(r["status"] != "ok" for r in phases.values()):
        handles.append(Patch(facecolor="white", hatch="xx", edgecolor="black", linewidth=0.5,
                             label="stopped (killed / timed out / failed): RSS reached"))
    ax.legend(handles=handles, fontsize=8, loc="upper center", ncol=2)
    ax.set_ylim(0, top * 1.4)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_ylabel("peak RSS (GiB)")
    m = results["machine"]
    ours = s.get("compute_dtype", m["fast_dtype"])
    ax.set_title(f"{results['preset']} preset: batch {BATCH} x seq {s['seq']}, {s['steps']} steps; "
                 f"{m['cpus']} CPUs, {m['memory_gib']:g} GiB; compute {ours} (ours), "
                 f"{s['ref_compute_dtype']} (usual recipe)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="7b")
    ap.add_argument("--out", type=Path, default=Path("runs/e2e"), help="results.json, e2e.png, logs, the run")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="where checkpoints are kept (reused)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rss-cap-gib", type=float, default=21.0, help="kill any phase above this RSS")
    ap.add_argument("--ref-timeout", type=float, default=3600.0, help="seconds before a reference phase is stopped")
    ap.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="our compute dtype (load, plan, train); 'auto' is this CPU's fast dtype")
    ap.add_argument("--ref-compute-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: this CPU's fast dtype (float32 without AVX512-BF16/AMX)")
    ap.add_argument("--ref-optimizer", choices=["paged_adamw_8bit", "adamw"], default="paged_adamw_8bit")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every phase (default: torch's)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the merged folders (deleted by default)")
    ap.add_argument("--child", nargs=2, metavar=("PHASE", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(*args.child)

    # This process imports no torch: ru_maxrss of a child starts at the parent's RSS when it is spawned.
    phases = [p for p in PHASES if p in args.phases and not (args.skip_reference and p in REFERENCE)]
    shape = PRESETS[args.preset]
    out = args.out.resolve()
    (out / "phases").mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    spec = {"preset": args.preset, "cache": str(args.cache.resolve()), "vocab": shape["vocab"], "seq": args.seq,
            "steps": args.steps, "threads": args.threads, "run_dir": str(run_dir),
            "compute_dtype": args.compute_dtype,
            "random_adapter": "ours-train" not in phases and not (run_dir / "adapter" / "adapter_config.json").exists(),
            "data": str(write_data(out / "data" / "train.jsonl", token_rows(shape["vocab"], args.seq, args.steps * BATCH))),
            "export_dir": str(out / "merged-ours"), "merge_dir": str(out / "merged-ref"),
            "results_dir": str(out / "phases"), "ref_optimizer": args.ref_optimizer}
    spec_path = out / "phases" / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    cap = int(args.rss_cap_gib * GIB)
    print(f"preparing the {args.preset} checkpoint in {args.cache} (written once, then reused; log in "
          f"{out / 'phases' / 'prepare.log'})", flush=True)
    prepared = measure("prepare", spec, spec_path, cap, None)
    if prepared["status"] != "ok":
        sys.exit(describe("prepare", prepared))
    info = prepared["machine"]
    ref_dtype = args.ref_compute_dtype or info["fast_dtype"]
    model = Path(prepared["model"])
    ours_dtype = prepared["compute_dtype"]
    spec.update(model=str(model), adapter=prepared["adapter"], ref_dtype=ref_dtype,
                gemm_dtypes=sorted({ours_dtype, ref_dtype}))
    spec_path.write_text(json.dumps(spec, indent=2))
    print(f"machine: {info['cpus']} CPUs ({info['cpu']}), {info['memory_gib']} GiB, fast dtype "
          f"{info['fast_dtype']}; our compute dtype {ours_dtype} ({args.compute_dtype!r}), the reference's "
          f"{ref_dtype}", flush=True)
    if spec["random_adapter"] and {"ours-export", "ref-merge"} & set(phases):
        print(f"no trained adapter in {run_dir}: merging the random one in {spec['adapter']}")
    results = {"preset": args.preset, "shape": shape, "machine": info, "model": str(model),
               "settings": {"seq": args.seq, "steps": args.steps, "batch": BATCH, "lora": LORA,
                            "compute_dtype": ours_dtype,
                            "optimizer": "paged_adamw_8bit", "ref_optimizer": args.ref_optimizer,
                            "ref_compute_dtype": ref_dtype, "threads": args.threads,
                            "rss_cap_gib": args.rss_cap_gib, "ref_timeout_s": args.ref_timeout},
               "plan": prepared["plan"], "load_prediction": prepared["load_prediction"], "phases": {}}
    if {"ours-train", "ref-train"} & set(phases):
        gemm = measure("gemm", spec, spec_path, cap, None)
        results["gemm"] = {k: v for k, v in gemm.items() if isinstance(v, dict)}
        print("GEMM: " + ", ".join(f"{k} {v['flops'] / 1e9:.1f} GFLOP/s ({v['n']}^3)"
                                   for k, v in results["gemm"].items()), flush=True)

    for phase in phases:
        predicted = None
        if phase == "ours-load":
            load = prepared["load_prediction"]
            predicted = load["total"]
            print(f"{phase}: planned peak {predicted / GIB:.2f} GiB (" + ", ".join(
                f"{k} {v / GIB:.2f}" for k, v in load["parts"].items()) + "; the planner's static bytes and "
                "interpreter term, plus the loader's transient, which the planner does not model)", flush=True)
        elif phase == "ours-train":
            predicted = prepared["plan"]["total"]
            print(f"{phase}: {prepared['plan_summary']}", flush=True)
        elif phase == "ours-export":
            print(f"{phase}: not predicted (the planner plans training)", flush=True)
        else:
            print(f"{phase}: the usual recipe, not predicted", flush=True)
        evict(model)
        r = measure(phase, spec, spec_path, cap, args.ref_timeout if phase in REFERENCE else None)
        if predicted is not None:
            r["predicted"] = predicted
            if r["status"] == "ok":
                r["error"] = predicted / r["peak_rss"] - 1
        if r.get("step_s"):
            r["s_per_step"] = sum(r["step_s"]) / len(r["step_s"])
            rate = results.get("gemm", {}).get(r["compute_dtype"].removeprefix("torch."), {}).get("flops")
            if rate:
                r["floor_s_per_step"] = 6 * prepared["linear_weights"] * BATCH * args.seq / rate
                r["floor_ratio"] = r["s_per_step"] / r["floor_s_per_step"]
        if not args.keep_outputs:
            for folder in ("export_dir", "merge_dir"):
                shutil.rmtree(spec[folder], ignore_errors=True)
        results["phases"][phase] = r
        print(describe(phase, r), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    plot(results, out / "e2e.png")
    print()
    print(table(results))
    print(f"\nwrote {out / 'results.json'} and {out / 'e2e.png'}; per-phase logs in {out / 'phases'}")


if __name__ == "__main__":
    main()
