"""`qlora-kit generate`: answer a prompt with a (quantised) model, optionally with an adapter."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model folder, optionally with an adapter")
    p.add_argument("--model", required=True, help="local Hugging Face model folder ('smollm2' for the demo model)")
    p.add_argument("--adapter", help="adapter folder (PEFT layout) to apply")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for several)")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8, 16], help="16 loads the base unquantised")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template (default on)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..generation import check_prompts, generate
    from ..models import resolve_model_path
    from ..quant import QuantConfig
    from .. import load_adapter, load_model

    check_prompts(args.prompt)  # before the model is loaded
    quant = None if args.bits == 16 else QuantConfig(bits=args.bits)
    model, tok = load_model(resolve_model_path(args.model), quant=quant, device=args.device)
    if args.adapter:
        load_adapter(model, args.adapter)
    for prompt, answer in zip(args.prompt, generate(model, tok, args.prompt, args.max_new_tokens, chat=args.chat)):
        print(f">>> {prompt}\n{answer}\n")
    return 0
