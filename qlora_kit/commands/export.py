"""`qlora-kit export`: merge an adapter into its base and write a Hugging Face folder or one GGUF file (streamed)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="merge an adapter into its base model and write a Hugging Face folder or a GGUF file")
    p.add_argument("--base", required=True, help="base model folder the adapter was trained on ('smollm2' for the demo model)")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    p.add_argument("--out", required=True, help="folder to write (a .gguf file with --format gguf); it appears complete or not at all")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "gguf"],
                   help="safetensors: a Hugging Face folder (default); gguf: one file for llama.cpp, Ollama, LM Studio")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of the written safetensors weights (default bf16)")
    p.add_argument("--gguf-type", default="f16", help="GGUF weight type: f16 (default), bf16 or q8_0")
    p.add_argument("--merge-into", default="dequantized", choices=["dequantized", "original"],
                   help="dequantized: the quantised base the adapter was trained on (default); original: the base's own weights")
    p.add_argument("--compute-dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype the base was cast to before it was quantised in training (default: the adapter's "
                        "record; for a PEFT adapter, the checkpoint's stored dtype, as transformers loads it)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, like 2GB, 500MB or 4GiB")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier qlora_kit export at OUT, once the new one is complete and verified "
                        "(anything else at OUT, and the base or adapter folders, are never replaced)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading the export and comparing logits (needs the model in fp32 in memory)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import QLoraKitError

    if args.format == "gguf":
        from ..export import export_gguf, format_gguf_report

        if args.dtype is not None:
            raise QLoraKitError("--dtype sets safetensors weights; for GGUF choose --gguf-type f16, bf16 or q8_0")
        report = export_gguf(args.base, args.adapter, args.out, gguf_type=args.gguf_type, merge_into=args.merge_into,
                             overwrite=args.overwrite, verify=args.verify,
                             compute_dtype=args.compute_dtype)
        print(format_gguf_report(report), end="")
        print(f"wrote {args.out}")
        return 0

    from ..export import export_merged, format_report

    report = export_merged(args.base, args.adapter, args.out, dtype=args.dtype or "bf16", merge_into=args.merge_into,
                           max_shard_size=args.max_shard_size, overwrite=args.overwrite, verify=args.verify,
                           compute_dtype=args.compute_dtype)
    print(format_report(report), end="")
    print(f"wrote {args.out} (report in {args.out}/report.json)")
    return 0
