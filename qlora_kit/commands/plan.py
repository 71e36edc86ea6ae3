"""`qlora-kit plan MODEL`: will this fine-tune fit my GPU? Answered from the config alone."""

from __future__ import annotations

import json
import math

from ..optim import DEFAULT_OPTIMIZER, OPTIMIZERS

GiB = 1024 ** 3


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory needed to fine-tune MODEL, per component, and which GPUs it fits",
                       description="MODEL is a local folder, a config.json, or a preset: "
                                   "llama-2-7b, llama-3.1-8b, mistral-7b, qwen2.5-7b, gemma-2-9b, ...")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8, 16], help="16 plans an unquantised (bf16) base")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax constants in fp32")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--targets", default="all-linear",
                   help="'all-linear', comma-separated module suffixes (q_proj,v_proj) or a regex")
    p.add_argument("--dropout", type=float, default=None,
                   help="LoRA dropout (0 saves its activations); default 0.05, or 0 with --target-experts")
    p.add_argument("--target-experts", action="store_true",
                   help="MoE models: adapters on every expert too (lora.target_experts)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-blocks", type=int, metavar="N", help="checkpoint only the first N decoder blocks")
    p.add_argument("--budget", metavar="SIZE",
                   help="checkpoint the fewest blocks whose plan fits SIZE (12GiB, 16GB), as train's "
                        "gradient_checkpointing: auto does")
    p.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, choices=OPTIMIZERS)
    p.add_argument("--adapter-dtype", default="auto",
                   help="dtype of the adapter matmuls (master weights are fp32); auto = the compute dtype")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--gpu-gb", type=float, help="also judge a card with this much memory (GiB, as cards are sold)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a stacked bar chart of the breakdown")
    p.set_defaults(func=run)


def _targets(text: str) -> str | list[str]:
    if text == "all-linear" or not all(part.strip().isidentifier() for part in text.split(",")):
        return text
    return [part.strip() for part in text.split(",")]


def build_plan(args):
    from ..fit import fewest_checkpointed_blocks, parse_budget
    from ..lora import LoraConfig
    from ..plan import plan_memory
    from ..quant import QuantConfig

    quant = None if args.bits == 16 else QuantConfig(bits=args.bits, quant_type=args.quant_type,
                                                     double_quant=not args.no_double_quant)
    dropout = args.dropout if args.dropout is not None else (0.0 if args.target_experts else 0.05)
    lora = LoraConfig(r=args.r, dropout=dropout, targets=_targets(args.targets), dtype=args.adapter_dtype,
                      target_experts=args.target_experts)
    checkpointing = args.checkpoint_blocks if args.checkpoint_blocks is not None else not args.no_gradient_checkpointing
    plan = plan_memory(args.model, quant, lora, batch=args.batch, seq_len=args.seq_len,
                       gradient_checkpointing=checkpointing, optimizer=args.optimizer, device=args.device)
    if args.budget is not None:
        plan = fewest_checkpointed_blocks(plan, parse_budget(args.budget))
    return plan


def gpu_table(plan, gpu_gb: float | None = None) -> dict[str, int]:
    from ..fit import GPUS

    gpus = dict(GPUS)
    if gpu_gb:
        gpus[f"your GPU {gpu_gb:g}GB"] = int(gpu_gb * GiB)
    return gpus


def run(args) -> int:
    from ..errors import QLoraKitError
    from ..fit import parse_budget
    from ..plan import COMPONENTS

    if args.gpu_gb is not None and not (math.isfinite(args.gpu_gb) and args.gpu_gb > 0):
        raise QLoraKitError(f"--gpu-gb {args.gpu_gb:g}: give the card's memory in GB, e.g. --gpu-gb 24")
    plan = build_plan(args)
    gpus = gpu_table(plan, args.gpu_gb)
    verdicts = {name: {"memory": size, "fits": plan.fits(size), "max_batch": plan.max_batch_seq(size)}
                for name, size in gpus.items()}
    if args.plot:
        plot(plan, args.plot, gpus)
    if args.json:
        out = plan.to_dict()
        out["gpus"] = {name: {"memory": v["memory"], "fits": v["fits"],
                              "max_batch_at_seq_len": {str(k): b for k, b in v["max_batch"].items()}}
                       for name, v in verdicts.items()}
        print(json.dumps(out, indent=2))
        return 0
    s = plan.settings
    print(f"{plan.model}: {plan.parameters / 1e9:.2f}B parameters, {plan.trainable_parameters / 1e6:.1f}M trainable")
    print(f"settings: {plan.summary().split(': ', 1)[1].rsplit(':', 1)[0]}")
    width = max(len(v) for v in COMPONENTS.values())
    for key, label in COMPONENTS.items():
        print(f"  {label:<{width}}  {plan.components[key] / GiB:8.2f} GiB")
    print(f"  {'total':<{width}}  {plan.total / GiB:8.2f} GiB")
    for note in plan.notes:
        print(f"  note: {note}")
    if args.budget is not None:
        k, layers = s["checkpointed_blocks"], s["layers"]
        print(f"  budget {args.budget}: " + (f"checkpoint {k} of {layers} decoder blocks (the fewest that fit)"
                                            if plan.total <= parse_budget(args.budget) else
                                            "does not fit even with every block checkpointed"))
    print()
    for name, v in verdicts.items():
        fitting = [f"{b} x {seq}" for seq, b in v["max_batch"].items() if b]
        best = ", ".join(fitting[-3:]) if fitting else "nothing: even batch 1 x 512 does not fit"
        mark = "fits     " if v["fits"] else "too small"
        print(f"  {name:<22} {v['memory'] / GiB:5.1f} GiB  {mark}  largest batch x seq: {best}")
    if s["device"] == "cpu":
        print("\n(planned for CPU: GPU verdicts are for comparison only)")
    return 0


def plot(plan, path: str, gpus: dict[str, int]) -> None:
    """A single stacked bar of the breakdown, with the GPUs' memory as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plan import COMPONENTS

    fig, ax = plt.subplots(figsize=(6, 6))
    bottom = 0.0
    for key, label in COMPONENTS.items():
        value = plan.components[key] / GiB
        if value > 0:
            ax.bar(0, value, bottom=bottom, width=0.5, label=f"{label}: {value:.2f} GiB")
            bottom += value
    for name, size in gpus.items():
        if size / GiB <= max(bottom * 1.6, 13):
            ax.axhline(size / GiB, color="grey", linestyle="--", linewidth=0.8)
            ax.text(0.3, size / GiB, name, va="bottom", fontsize=8, color="dimgrey")
    s = plan.settings
    ax.set_title(f"{plan.model}: {plan.total / GiB:.1f} GiB\nbatch {s['batch']} x seq {s['seq_len']}, r{s['r']}, "
                 f"{s['optimizer']}", fontsize=10)
    ax.set_ylabel("GiB")
    ax.set_xticks([])
    ax.set_xlim(-0.5, 1.2)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
