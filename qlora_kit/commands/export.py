"""`qlora-kit export`: merge an adapter into its base and write a plain Hugging Face folder (streamed)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="merge an adapter into its base model and write a Hugging Face folder")
    p.add_argument("--base", required=True, help="base model folder the adapter was trained on ('smollm2' for the demo model)")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    p.add_argument("--out", required=True, help="folder to write; it appears complete or not at all")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the written weights")
    p.add_argument("--merge-into", default="dequantized", choices=["dequantized", "original"],
                   help="dequantized: the quantised base the adapter was trained on (default); original: the base's own weights")
    p.add_argument("--max-shard-size", default="2GB", help="largest shard, like 2GB, 500MB or 4GiB")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading the export and comparing logits (needs the model in fp32 in memory)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import export_merged, format_report

    report = export_merged(args.base, args.adapter, args.out, dtype=args.dtype, merge_into=args.merge_into,
                           max_shard_size=args.max_shard_size, overwrite=args.overwrite, verify=args.verify)
    print(format_report(report), end="")
    print(f"wrote {args.out} (report in {args.out}/report.json)")
    return 0
