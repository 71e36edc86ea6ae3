"""The `qlora-kit` command. Each subcommand lives beside the code it drives and registers itself
through a `register(subparsers)` function listed in COMMANDS."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import QLoraKitError
from .io import is_disk_full

# module -> its register(subparsers) adds one subcommand whose handler is set with set_defaults(func=...)
COMMANDS = [
    "qlora_kit.commands.train",
    "qlora_kit.commands.generate",
    "qlora_kit.commands.plan",
    "qlora_kit.commands.export",
    "qlora_kit.commands.rank_report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-kit", description="QLoRA fine-tuning: train, export, plan, generate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except QLoraKitError as e:
        print(f"qlora-kit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command may say how to carry on
        print(f"qlora-kit {args.command}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except OSError as e:  # a full disk wherever no writer caught it first
        if not is_disk_full(e):
            raise
        print(f"qlora-kit {args.command}: error: the disk is full ({e}); free some space and run the command "
              "again", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
