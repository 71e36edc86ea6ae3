"""`qlora-kit export`: merge an adapter into its base and write a Hugging Face folder, one GGUF file, or an
Ollama folder (GGUF + Modelfile), streamed."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="merge an adapter into its base model and write a Hugging Face folder or a GGUF file")
    p.add_argument("--base", required=True, help="base model folder the adapter was trained on ('smollm2' for the demo model)")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    p.add_argument("--out", required=True, help="folder to write (a .gguf file with --format gguf); it appears complete or not at all")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "gguf", "ollama"],
                   help="safetensors: a Hugging Face folder (default); gguf: one file for llama.cpp, Ollama, LM Studio; "
                        "ollama: a folder with model.gguf and a Modelfile for `ollama create NAME -f OUT/Modelfile`")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of the written safetensors weights (default bf16)")
    p.add_argument("--gguf-type", default="f16",
                   help="GGUF weight type: f16 (default), bf16, q8_0, or a K-quant made by llama.cpp's own quantiser "
                        "(q4_k_m, q5_k_m, q6_k, ...; needs pip install 'qlora_kit[gguf]')")
    p.add_argument("--eval-file", default=None,
                   help="held-out JSONL (the training format): the report compares perplexity of the adapter on its "
                        "quantised base, the merged model and the GGUF in llama.cpp (default: the run's data.eval, "
                        "when the adapter lies in a run folder)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="most tokens of --eval-file to evaluate (default 4096)")
    p.add_argument("--no-eval", dest="eval_file", action="store_false", help="no held-out perplexity, not even the run's")
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

    evaluate = dict(eval_file=args.eval_file, eval_tokens=args.eval_tokens)
    if args.format in ("gguf", "ollama"):
        from ..export import export_gguf, export_ollama, format_gguf_report

        if args.dtype is not None:
            raise QLoraKitError("--dtype sets safetensors weights; for GGUF choose --gguf-type (f16, bf16, q8_0, q4_k_m, ...)")
        export = export_gguf if args.format == "gguf" else export_ollama
        report = export(args.base, args.adapter, args.out, gguf_type=args.gguf_type, merge_into=args.merge_into,
                        overwrite=args.overwrite, verify=args.verify, compute_dtype=args.compute_dtype, **evaluate)
        print(format_gguf_report(report), end="")
        if args.format == "ollama":
            print(f"wrote {args.out} (model.gguf, Modelfile, report.txt); load it with: "
                  f"ollama create NAME -f {args.out}/Modelfile")
        else:
            print(f"wrote {args.out}")
        return 0

    from ..export import export_merged, format_report

    report = export_merged(args.base, args.adapter, args.out, dtype=args.dtype or "bf16", merge_into=args.merge_into,
                           max_shard_size=args.max_shard_size, overwrite=args.overwrite, verify=args.verify,
                           compute_dtype=args.compute_dtype, **evaluate)
    print(format_report(report), end="")
    print(f"wrote {args.out} (report in {args.out}/report.json)")
    return 0
