"""`qlora-kit train CONFIG.yaml`: a complete fine-tuning run from one YAML file."""

from __future__ import annotations

import os
import shlex


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA on a quantised base, as a YAML config says")
    p.add_argument("config", help="run config (YAML); see README for every key")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the qlora_kit run in output.dir: the new run is written beside it and takes its "
                        "place only when it finishes (a folder qlora_kit did not write is never replaced)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=10 (YAML syntax for the value; "
                        "read as if written in the file, so relative paths are relative to it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from ..config import load_config
    from ..errors import QLoraKitError
    from ..runs import folder_state
    from ..trainer import train

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise QLoraKitError(f"--set {item!r}: use SECTION.KEY=VALUE, e.g. train.lr=1e-4")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise QLoraKitError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    config = load_config(args.config, overrides)
    replacing = args.overwrite and folder_state(config.output.dir) == "run"
    try:
        result = train(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_hint(args, config.output.dir, replacing)) from None
    if os.environ.get("RANK", "0") != "0":  # one summary per run, not per process
        return 0
    if result.eval_before is not None or result.eval_after is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"held-out loss: {fmt(result.eval_before)} -> {fmt(result.eval_after)}")
    print(f"adapter: {result.adapter_dir}\nmetrics: {result.run_dir / 'metrics.jsonl'}, plot: {result.run_dir / 'loss.png'}")
    return 0


def interrupted_hint(args, out, replacing: bool) -> str:
    """What Ctrl-C left behind, and the exact command that carries on from there."""
    from ..checkpoints import latest_checkpoint

    command = ["qlora-kit", "train", args.config, *(part for item in args.set for part in ("--set", item))]
    if replacing:
        return (f"nothing was replaced: the previous run in {out} is as it was; to start the new run again: "
                f"{shlex.join(command + ['--overwrite'])}")
    last = latest_checkpoint(out)
    if last is None:
        return f"no checkpoint was written yet; to start again: {shlex.join(command)}"
    return f"the newest checkpoint is {last}; to continue from it: {shlex.join(command + ['--resume'])}"
