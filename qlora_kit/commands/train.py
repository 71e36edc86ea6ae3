"""`qlora-kit train CONFIG.yaml`: a complete fine-tuning run from one YAML file."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA on a quantised base, as a YAML config says")
    p.add_argument("config", help="run config (YAML); see README for every key")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete output.dir's previous run and start again")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=10 (YAML syntax for the value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from ..config import load_config
    from ..errors import QLoraKitError
    from ..trainer import train

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise QLoraKitError(f"--set {item!r}: use SECTION.KEY=VALUE, e.g. train.lr=1e-4")
        overrides[key] = yaml.safe_load(value)
    config = load_config(args.config, overrides)
    result = train(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # one summary per run, not per process
        return 0
    if result.eval_before is not None or result.eval_after is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"held-out loss: {fmt(result.eval_before)} -> {fmt(result.eval_after)}")
    print(f"adapter: {result.adapter_dir}\nmetrics: {result.run_dir / 'metrics.jsonl'}, plot: {result.run_dir / 'loss.png'}")
    return 0
