"""Training speed and memory: qlora_kit against the usual transformers + peft + bitsandbytes recipe.

    python benchmarks/vs_recipe.py [--preset llama-1024|smollm2-trivia|...] [--steps 8] [--warmup 2] [--out DIR]
                                   [--ref-dtype auto|bf16|fp32] [--checkpoint auto|all|N] [--budget 1.4GiB]
                                   [--profile]

One invocation runs both sides on the same model folder, batch, sequence length, data, LoRA
settings and initial adapter, each in its own child process (so imports, allocator state and peak
RSS do not mix), then prints each side's figures and the ratios qlora_kit / reference:

  tokens/s      median over the steps after warm-up;
  peak RSS      the process's resident-memory high-water mark while training (reset after loading),
                and the whole process's peak; on CUDA, peak allocated CUDA memory too;
  model bytes   parameters and buffers of the loaded model (quantised weights at their packed size);
  trainable     adapter parameters;
  loss          per step, and the mean of the last steps (the two sides must agree: same math);
  GEMM floor    6 x linear params x tokens FLOP per step in a checkpointed block (forward,
                recomputed forward and input gradient, each 2 FLOP per weight per token; frozen
                weights have no weight gradient), 4 x in a block that is not checkpointed, plus the
                output head's 4 x vocab x hidden x tokens (forward and input gradient), at this
                machine's measured matmul throughput in the compute dtype, timed in the same run.
                "x floor" = step time / floor.
  ckpt          decoder blocks checkpointed / all blocks.

The reference: transformers `BitsAndBytesConfig` (NF4, double quant), peft `LoraConfig` (r16,
alpha 32, dropout 0.05, all seven projections), `prepare_model_for_kbit_training`, non-reentrant
gradient checkpointing, torch AdamW; its forward computes the loss from full logits, as the
recipe does. Ours: `load_model` + `add_lora` + `set_gradient_checkpointing` + the trainer's loss
module and optimiser (the same pieces `qlora_kit.train` runs each step), also torch AdamW here so
the update rule is identical. Ours checkpoints as the trainer does by default
(`train.gradient_checkpointing: auto`): the fewest blocks whose memory plan fits the budget
(--budget, else the trainer's default: half the available RAM on CPU, the GPU's free memory);
--checkpoint all checkpoints every block, as the recipe does.

Host memory: qlora_kit fixes glibc's mmap threshold at 4 MiB and trims its heap between phases
of a step (qlora_kit.memory); the recipe runs with glibc's default unless --reference-allocator
qlora_kit gives it the same, which separates that effect. QLORA_KIT_MALLOC_THRESHOLD in the
environment reaches both children.

Compute dtype: "auto" gives both sides the dtype this device multiplies fastest (bf16 on GPUs and
CPUs with AVX512-BF16/AMX; fp32 on AVX2-only CPUs, where a bf16 matmul is emulated and >100x
slower). `--ref-dtype bf16` runs the recipe exactly as usually written (bf16 compute) for
comparison; on an AVX2-only CPU expect it to take minutes per step.

Data: for random-init presets, sequences of a random 16-token motif repeated (learnable, so the
loss falls and the two sides' losses can be compared); for `smollm2`, chatterbot-corpus
conversations with the model's chat template, concatenated and cut into full rows.

Real data (`--preset smollm2-trivia`): the demo's trivia chats (qlora_kit.demo_task, 235 training
records) tokenised by qlora_kit's data pipeline at their own lengths, the loss on the answers only,
8 examples a step by default (the demo's batch; --seq 128 is the demo's max length). Both sides get
the same examples each step. Ours packs them as the trainer does (qlora_kit.data.collate: several
examples a row of at most --seq tokens, position ids restarting per example, attention confined to
each example); the recipe pads each batch to its longest example with an attention mask, as a
transformers data collator does. tokens/s counts real tokens only (the examples' own tokens, no
padding) on both sides, and the GEMM floor is counted on the same tokens.

Writes results.json and chart.png to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from export_7b import default_cache
from plan_accuracy import cpu_kind, reset_hwm, vm_hwm, vm_rss

PRESETS = {  # name -> Llama shape (hidden, intermediate, layers, heads, kv heads, vocab)
    "tiny": (256, 688, 2, 4, 4, 32000),
    "llama-512": (512, 1408, 8, 8, 8, 32000),
    "llama-1024": (1024, 2816, 12, 16, 16, 32000),
    "llama-2048": (2048, 5632, 16, 16, 16, 32000),
    "smollm2": None,  # the real SmolLM2-135M-Instruct
    "smollm2-trivia": None,  # the same model on the demo's trivia chats, real lengths, packed on our side
}
REAL_DATA = {"smollm2-trivia"}  # presets whose batches are whole examples of their own lengths
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT, LR = 16, 32, 0.05, 2e-4
MIB = 2 ** 20


# ------------------------------------------------------------------ parent: inputs

def model_folder(preset: str) -> Path:
    if preset.startswith("smollm2"):
        from qlora_kit.models import smollm2_path
        return smollm2_path()
    folder = default_cache() / f"recipe-{preset}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, inter, layers, heads, kv, vocab = PRESETS[preset]
    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                  max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


def make_data(folder: Path, preset: str, steps: int, batch: int, seq: int, out: Path) -> Path:
    """input_ids of shape (steps, batch, seq), the same for both sides; for a real-data preset, the
    examples of each step as (input_ids, labels) lists instead (see real_examples)."""
    import torch
    from safetensors.torch import save_file

    if preset in REAL_DATA:
        path = out / "data.json"
        path.write_text(json.dumps(real_examples(folder, steps, batch, seq)))
        return path
    g = torch.Generator().manual_seed(0)
    if preset == "smollm2":
        import random

        from qlora_kit.datasets import chatterbot_records
        from qlora_kit.loading import load_tokenizer_from

        tok = load_tokenizer_from(folder)
        records = chatterbot_records()
        random.Random(0).shuffle(records)
        ids: list[int] = []
        for r in records:
            ids += tok(tok.apply_chat_template(r["messages"], tokenize=False))["input_ids"]
            if len(ids) >= steps * batch * seq:
                break
        ids = (ids * (1 + steps * batch * seq // max(1, len(ids))))[:steps * batch * seq]
        data = torch.tensor(ids).view(steps, batch, seq)
    else:
        vocab = PRESETS[preset][5]
        motif = torch.randint(0, vocab, (steps, batch, 16), generator=g)
        data = motif.repeat(1, 1, math.ceil(seq / 16))[:, :, :seq].contiguous()
    path = out / "data.safetensors"
    save_file({"input_ids": data}, str(path))
    return path


def real_examples(folder: Path, steps: int, batch: int, seq: int) -> dict:
    """`steps` batches of `batch` examples: the demo's trivia chats (qlora_kit.demo_task) tokenised by
    qlora_kit's data pipeline, each at its own length (at most `seq`), the loss on the answers only.
    Both sides train on exactly these examples; how each lays them out is its own business."""
    from qlora_kit.data import build_dataset, prepare_tokenizer
    from qlora_kit.demo_task import task_records
    from qlora_kit.loading import load_tokenizer_from

    tokenizer = prepare_tokenizer(load_tokenizer_from(folder))
    examples = build_dataset(task_records()[0], tokenizer, max_seq_len=seq).examples
    examples = examples * (1 + steps * batch // len(examples))
    return {"pad_id": tokenizer.pad_token_id,
            "steps": [examples[i * batch:(i + 1) * batch] for i in range(steps)]}


def batches_of(data, pack_to: int | None) -> tuple[list[dict], list[int]]:
    """Each step's batch and its real (non-pad) tokens. Synthetic data: the (batch, seq) rows, every
    token trained. Real examples: qlora_kit's collate, packing several examples a row with positions
    restarting per example when pack_to is given (ours), else padding each to the longest (the recipe)."""
    import torch

    from qlora_kit.data import collate

    if isinstance(data, torch.Tensor):
        return [{"input_ids": ids, "labels": ids} for ids in data], [ids.numel() for ids in data]
    batches = [collate([tuple(e) for e in step], data["pad_id"], pack_to) for step in data["steps"]]
    return batches, [sum(len(ids) for ids, _ in step) for step in data["steps"]]


def make_adapter(folder: Path, out: Path) -> Path:
    """One initial adapter for both sides: PEFT's default init (Kaiming-uniform A, zero B), seeded."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    shapes = {"q_proj": (c.num_attention_heads * head_dim, c.hidden_size),
              "k_proj": (c.num_key_value_heads * head_dim, c.hidden_size),
              "v_proj": (c.num_key_value_heads * head_dim, c.hidden_size),
              "o_proj": (c.hidden_size, c.num_attention_heads * head_dim),
              "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
              "down_proj": (c.hidden_size, c.intermediate_size)}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(c.num_hidden_layers):
        for p, (out_f, in_f) in shapes.items():
            block = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{i}.{block}.{p}"
            bound = 1.0 / math.sqrt(in_f)
            tensors[f"{name}.lora_A.weight"] = torch.empty(R, in_f).uniform_(-bound, bound, generator=g)
            tensors[f"{name}.lora_B.weight"] = torch.zeros(out_f, R)
    path = out / "adapter_init.safetensors"
    save_file(tensors, str(path))
    return path


def gemm_flops(dtype_name: str, n: int = 2048, repeats: int = 3) -> float:
    """Best-of matmul throughput (FLOP/s) of this machine in a dtype, n x n x n."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    if dtype != torch.float32 and not torch.cuda.is_available():
        n = 512  # an emulated 16-bit GEMM is slow: keep the probe short
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# ------------------------------------------------------------------ children

def _common_setup(args):
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = json.loads(Path(args.data).read_text()) if args.data.endswith(".json") else load_file(args.data)["input_ids"]
    init = load_file(args.adapter)
    return torch, data, init


def _copy_init(named_layers: dict, init: dict) -> None:
    """named_layers: module name -> (lora_A Linear, lora_B Linear)."""
    import torch

    with torch.no_grad():
        for name, (a, b) in named_layers.items():
            a.weight.copy_(init[f"{name}.lora_A.weight"])
            b.weight.copy_(init[f"{name}.lora_B.weight"])


def _train_loop(torch, step_fn, params, batches, tokens, device, profile: str | None, after_step=None) -> dict:
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    times, losses = [], []
    steps = len(batches)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_hwm()
    rss_before = vm_rss()
    prof = None
    for step in range(steps):
        if profile and step == steps - 1:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
            prof.__enter__()
        batch = {k: v.to(device) for k, v in batches[step].items()}
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        if after_step is not None:
            after_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(value)
        print(f"  step {step + 1}/{steps}: loss {value:.4f}, {times[-1]:.2f} s", file=sys.stderr, flush=True)
    out = {"step_s": times, "losses": losses, "tokens": tokens, "train_peak_rss": vm_hwm(),
           "rss_before_train": rss_before, "process_peak_rss": None}
    if cuda:
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    if prof is not None:
        prof.__exit__(None, None, None)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        Path(profile).write_text(table)
    return out


def checkpoint_choice(args, rows: int, device) -> tuple[int, str]:
    """How many decoder blocks our side checkpoints, and why: --checkpoint N or all, or with auto (the
    trainer's default) the fewest whose memory plan fits --budget, else the device's default budget."""
    from qlora_kit import LoraConfig, QuantConfig, plan_memory
    from qlora_kit.fit import default_budget, fewest_checkpointed_blocks, parse_budget

    plan = plan_memory(args.model, QuantConfig(compute_dtype=args.dtype), LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT,
                       targets=PROJECTIONS), batch=rows, seq_len=args.seq, gradient_checkpointing=True,
                       optimizer="adamw", device=device.type, chunk_tokens=1024)
    layers = plan.settings["layers"]
    if args.checkpoint != "auto":
        blocks = layers if args.checkpoint == "all" else min(int(args.checkpoint), layers)
        return blocks, f"checkpointing {blocks} of {layers} blocks (--checkpoint {args.checkpoint})"
    budget, source = (parse_budget(args.budget), "--budget") if args.budget else default_budget(device)
    plan = fewest_checkpointed_blocks(plan, budget)
    blocks = plan.settings["checkpointed_blocks"]
    return blocks, (f"checkpointing {blocks} of {layers} blocks, the fewest whose plan ({plan.total / MIB:.0f} MiB) "
                    f"fits {budget / MIB:.0f} MiB ({source})")


def child_ours(args) -> dict:
    torch, data, init = _common_setup(args)
    from qlora_kit import LoraConfig, QuantConfig, add_lora, load_model
    from qlora_kit import lora_layers, trainable_parameters
    from qlora_kit.loading import set_gradient_checkpointing
    from qlora_kit.memory import release_freed_memory
    from qlora_kit.modeltree import decoder_layers
    from qlora_kit.trainer import LossModule

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    model, _ = load_model(args.model, quant=QuantConfig(compute_dtype=args.dtype), load_tokenizer=False,
                          progress=False, device=device)
    add_lora(model, LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT, targets=PROJECTIONS))
    _copy_init({n: (m.lora_A, m.lora_B) for n, m in lora_layers(model).items()}, init)
    batches, tokens = batches_of(data, pack_to=args.seq)  # packs real examples; synthetic rows stay as they are
    blocks, choice = checkpoint_choice(args, max(b["input_ids"].shape[0] for b in batches), device)
    print(f"  ours: {choice}", file=sys.stderr, flush=True)
    set_gradient_checkpointing(model, blocks)
    model.train()
    load_s = time.perf_counter() - t
    loss_module = LossModule(model, chunk_tokens=1024)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = trainable_parameters(model)
    model_bytes = sum(m.nbytes() for m in model.modules() if hasattr(m, "qweight"))
    packed = {id(m.weight) for m in model.modules() if hasattr(m, "qweight")}
    packed |= {id(m.bias) for m in model.modules() if hasattr(m, "qweight") and m.bias is not None}
    model_bytes += sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in packed)
    model_bytes += sum(b.numel() * b.element_size() for b in model.buffers())

    def step(batch):
        loss, _ = loss_module(**batch)
        return loss

    result = _train_loop(torch, step, params, batches, tokens, device, args.profile_to,
                         after_step=release_freed_memory)  # as the trainer does after each step
    result.update(load_s=load_s, trainable=trainable, model_bytes=model_bytes, linear_params=sum(m.in_features * m.out_features for m in lora_layers(model).values()),
                  compute_dtype=str(next(m.compute_dtype for m in model.modules() if hasattr(m, "qweight"))),
                  grad_norm_check=None, checkpointed_blocks=blocks, layers=len(decoder_layers(model)))
    return result


def child_reference(args) -> dict:
    torch, data, init = _common_setup(args)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_kit.dtypes import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    after_step = None
    if args.reference_allocator == "qlora_kit":
        from qlora_kit.memory import configure_allocator, release_freed_memory
        configure_allocator()
        after_step = release_freed_memory
    t = time.perf_counter()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=PROJECTIONS,
                                             task_type="CAUSAL_LM"))
    load_s = time.perf_counter() - t
    layers = {n.removeprefix("base_model.model."): (m.lora_A["default"], m.lora_B["default"])
              for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    _copy_init(layers, init)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    model_bytes = model.get_memory_footprint()

    def step(batch):
        return model(**batch).loss

    batches, tokens = batches_of(data, pack_to=None)  # the recipe pads each batch to its longest example
    result = _train_loop(torch, step, params, batches, tokens, device, args.profile_to, after_step)
    lin = sum(m.in_features * m.out_features for n, m in model.named_modules()
              if n.endswith(tuple(p + ".base_layer" for p in PROJECTIONS)))
    result.update(load_s=load_s, trainable=trainable, model_bytes=model_bytes, linear_params=lin,
                  compute_dtype=str(dtype), checkpointed_blocks=model.config.num_hidden_layers,
                  layers=model.config.num_hidden_layers)
    return result


# ------------------------------------------------------------------ parent

def run_child(side: str, args, data: Path, adapter: Path, folder: Path, dtype: str, profile: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model", str(folder), "--data", str(data),
           "--adapter", str(adapter), "--dtype", dtype, "--threads", str(args.threads or 0),
           "--reference-allocator", args.reference_allocator, "--seq", str(args.seq), "--checkpoint", args.checkpoint]
    if args.budget:
        cmd += ["--budget", args.budget]
    if profile:
        cmd += ["--profile-to", str(profile)]
    print(f"running {side} (compute dtype {dtype}) ...", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout = proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{side} child failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["process_peak_rss"] = usage.ru_maxrss * 1024
    result["wall_s"] = time.perf_counter() - started
    return result


def summarise(r: dict, warmup: int, floor_flops: float, vocab_hidden: int) -> dict:
    """tokens/s: the median over the steps after warm-up of each step's real tokens / its time (with
    synthetic data every token is real); the GEMM floor is counted on those real tokens too."""
    timed = list(zip(r["step_s"], r["tokens"]))[warmup:] or list(zip(r["step_s"], r["tokens"]))
    step = statistics.median(t for t, _ in timed)
    rate = statistics.median(n / t for t, n in timed)
    # a checkpointed block runs its forward twice: 6 FLOP per weight and token; an unchecked one 4
    per_token = (4 + 2 * r["checkpointed_blocks"] / r["layers"]) * r["linear_params"] + 4 * vocab_hidden
    floor_s = statistics.median(per_token * n / floor_flops for _, n in timed)
    last = r["losses"][-max(1, len(r["losses"]) // 4):]
    return {"tokens_per_s": rate, "step_s": step, "x_floor": step / floor_s,
            "train_peak_rss_mib": r["train_peak_rss"] / MIB, "process_peak_rss_mib": r["process_peak_rss"] / MIB,
            "model_mib": r["model_bytes"] / MIB, "trainable": r["trainable"], "loss_first": r["losses"][0],
            "loss_last": r["losses"][-1], "loss_tail_mean": sum(last) / len(last), "load_s": r["load_s"],
            "compute_dtype": r["compute_dtype"], "cuda_peak_mib": r.get("cuda_peak_bytes", 0) / MIB or None,
            "checkpointed_blocks": f"{r['checkpointed_blocks']}/{r['layers']}"}


def chart(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    colors = ["tab:blue", "tab:orange", "tab:gray"][:len(sides)]
    for ax, (key, title) in zip(axes, [("tokens_per_s", "tokens/s (higher is better)"),
                                       ("train_peak_rss_mib", "peak RSS while training, MiB"),
                                       ("model_mib", "model in memory, MiB")]):
        values = [summary[s][key] for s in sides]
        ax.bar(sides, values, color=colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), default="llama-1024")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="sequences (real-data presets: examples) a step; "
                   "default 4, or the demo's 8 for smollm2-trivia")
    p.add_argument("--seq", type=int, default=None, help="tokens a row (real-data presets: the longest example, and "
                   "our packed rows' length); default 256, or the demo's 128 for smollm2-trivia")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--dtype", default="auto", help="qlora_kit's compute dtype")
    p.add_argument("--ref-dtype", default="auto", help="the recipe's compute dtype (the usual recipe writes bf16)")
    p.add_argument("--also-ref-bf16", action="store_true",
                   help="also run the recipe with bf16 compute, as usually written (slow on AVX2-only CPUs)")
    p.add_argument("--reference-allocator", choices=["default", "qlora_kit"], default="default",
                   help="run the recipe with glibc's default allocator behaviour (as it ships) or with "
                        "qlora_kit's (qlora_kit.memory: freed memory trimmed after each step), to separate that effect")
    p.add_argument("--checkpoint", default="auto",
                   help="decoder blocks our side checkpoints: auto (the trainer's default: the fewest whose memory "
                        "plan fits --budget), all, or a number; the recipe checkpoints every block, as it is written")
    p.add_argument("--budget", default=None, help="memory budget for --checkpoint auto, e.g. 1.4GiB (default: the "
                   "trainer's, half the available RAM on CPU or the GPU's free memory)")
    p.add_argument("--loss-rtol", type=float, default=0.02, help="allowed relative difference of the last losses")
    p.add_argument("--profile", action="store_true", help="profile each side's last step (top ops by self time)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--profile-to", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    args = p.parse_args()
    real = args.preset in REAL_DATA
    args.batch = args.batch or (8 if real else 4)
    args.seq = args.seq or (128 if real else 256)

    if args.child:
        result = (child_ours if args.child == "ours" else child_reference)(args)
        print(json.dumps(result))
        return

    from qlora_kit.dtypes import dtype_name, resolve_dtype

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-vs-recipe-"))
    out.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.preset)
    data = make_data(folder, args.preset, args.steps, args.batch, args.seq, out)
    adapter = make_adapter(folder, out)
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder)
    vocab_hidden = c.vocab_size * c.hidden_size
    ours_dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype_name(resolve_dtype(args.dtype))]
    ref_dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype_name(resolve_dtype(args.ref_dtype))]
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the probe runs with the children's thread count
    flops = {d: gemm_flops(d) for d in sorted({ours_dtype, ref_dtype, "fp32", "bf16"})}
    print("matmul throughput here: " + ", ".join(f"{d} {f / 1e9:.1f} GFLOP/s" for d, f in flops.items()))

    runs = {"qlora_kit": ("ours", ours_dtype), "reference": ("reference", ref_dtype)}
    if args.also_ref_bf16 and ref_dtype != "bf16":
        runs["reference-bf16"] = ("reference", "bf16")
    raw, summary = {}, {}
    for label, (side, dtype) in runs.items():
        prof = out / f"profile-{label}.txt" if args.profile else None
        raw[label] = run_child(side, args, data, adapter, folder, dtype, prof)
        summary[label] = summarise(raw[label], args.warmup, flops[dtype], vocab_hidden)

    ours, ref = summary["qlora_kit"], summary["reference"]
    ratios = {"tokens_per_s": ours["tokens_per_s"] / ref["tokens_per_s"],
              "train_peak_rss": ours["train_peak_rss_mib"] / ref["train_peak_rss_mib"],
              "process_peak_rss": ours["process_peak_rss_mib"] / ref["process_peak_rss_mib"],
              "model_bytes": ours["model_mib"] / ref["model_mib"]}
    loss_rel = abs(ours["loss_tail_mean"] - ref["loss_tail_mean"]) / abs(ref["loss_tail_mean"])
    shape = (f"{args.batch} examples a step (ours packed into rows of <= {args.seq} tokens, the recipe's padded "
             f"to the longest), tokens/s on real tokens" if real else f"batch {args.batch} x seq {args.seq}")
    print(f"\n{cpu_kind()}")
    print(f"{args.preset}: {shape}, LoRA r{R} all seven projections, "
          f"{args.steps} steps ({args.warmup} warm-up), threads {args.threads or 'default'}")
    head = f"{'':16s}{'tok/s':>8s}{'s/step':>8s}{'x floor':>9s}{'train RSS':>11s}{'peak RSS':>10s}" \
           f"{'model':>8s}{'trainable':>11s}{'loss 0':>8s}{'loss end':>9s}{'dtype':>10s}{'ckpt':>7s}"
    print(head)
    for label, s in summary.items():
        print(f"{label:16s}{s['tokens_per_s']:8.1f}{s['step_s']:8.2f}{s['x_floor']:9.2f}"
              f"{s['train_peak_rss_mib']:9.0f}Mi{s['process_peak_rss_mib']:8.0f}Mi{s['model_mib']:6.0f}Mi"
              f"{s['trainable']:11,d}{s['loss_first']:8.3f}{s['loss_tail_mean']:9.3f}{s['compute_dtype'].removeprefix('torch.'):>10s}{s['checkpointed_blocks']:>7s}")
    print(f"ratios qlora_kit / reference: tokens/s {ratios['tokens_per_s']:.2f}x, peak RSS while training "
          f"{ratios['train_peak_rss']:.2f}x, whole-process peak RSS {ratios['process_peak_rss']:.2f}x, "
          f"model bytes {ratios['model_bytes']:.2f}x")
    verdict = "agree" if loss_rel <= args.loss_rtol else "DISAGREE"
    print(f"losses over the last steps {verdict}: relative difference {loss_rel:.4f} (tolerance {args.loss_rtol})")
    if "reference-bf16" in summary:
        rb = summary["reference-bf16"]
        print(f"against the recipe with bf16 compute: tokens/s {ours['tokens_per_s'] / rb['tokens_per_s']:.1f}x, "
              f"peak RSS while training {ours['train_peak_rss_mib'] / rb['train_peak_rss_mib']:.2f}x")
    results = {"cpu": cpu_kind(), "preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
               "gemm_flops": flops, "summary": summary, "ratios": ratios, "loss_rel_diff": loss_rel, "raw": raw}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    chart(summary, out / "chart.png")
    print(f"results in {out / 'results.json'}, chart in {out / 'chart.png'}")
    if loss_rel > args.loss_rtol:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
