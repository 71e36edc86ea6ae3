"""Streaming merged export: base checkpoint + LoRA adapter -> a plain Hugging Face folder.

    for each tensor of the base, in file order (memory-mapped, one at a time):
        W  = the merge base:  dequant(quant(W))  as the adapter saw it during training  ("dequantized")
                           or W as stored in the base folder                            ("original")
        W += scale * B @ A    (fp32, lora_delta: the same formula as the forward pass)
        write W in the export dtype into the current shard

Memory holds one tensor and its fp32 copy, never the model, so a 70B merge fits in a few GiB.
The merge itself is in merge.py, the shard writer in shards.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import QLoraKitError
from ..io import atomic_dir, disk_full_as_error
from ..dtypes import as_dtype, dtype_name
from ..quant import QuantConfig
from .heldout import DEFAULT_MAX_TOKENS, heldout_report, resolve_eval_file
from .job import prepare_merge, progress_bar
from .report import format_report
from .shards import ShardWriter, copy_side_files, parse_size, plan_shards, shard_name, total_bytes, write_index
from .target import DISK_ADVICE, DISK_MARGIN, check_disk, check_export_target
from .verify import verify_export

EXPORT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def export_merged(base: str | Path, adapter: str | Path, out: str | Path, dtype: str | torch.dtype = "bf16",
                  merge_into: str = "dequantized", max_shard_size: int | str = "2GB", overwrite: bool = False,
                  verify: bool = True, quant: QuantConfig | None = None, progress: bool = True,
                  on_shard: Callable[[int, int, Path], None] | None = None,
                  compute_dtype: str | torch.dtype | None = None, eval_file: str | Path | bool | None = None,
                  eval_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    """Merge `adapter` into the base model folder `base` and write a Hugging Face folder at `out`.

    dtype: bf16, fp16 or fp32 for the written weights (the merge itself is always fp32).
    merge_into: "dequantized" (the quantised base the adapter was trained on; default) or "original".
    quant: the base's quantisation, when the adapter's own metadata should not be used (PEFT adapters
        carry none; then NF4 + double quant, blocksize 64, bitsandbytes' usual setup, is assumed).
    compute_dtype: the dtype the base's weights were cast to before quantising (qlora_kit: its compute
        dtype). Default: the adapter's record; for adapters without one the checkpoint's stored dtype,
        as transformers loads it. Never this machine's 'auto', so every machine writes the same bytes.
    verify: reload the export with transformers (no missing or unexpected keys) and compare its logits
        with the adapter running on the quantised base; needs the model in fp32 in memory once.
    on_shard: called as on_shard(index, count, path) after each shard is written.
    eval_file: a held-out JSONL (the trainer's format): the report compares perplexity of the adapter on
        its quantised base with the merged model's (at most `eval_tokens` tokens). None: the eval file
        of the run the adapter comes from, if it names one; False: none.
    Writes atomically: `out` appears complete and verified, or not at all. overwrite replaces only an
    earlier qlora_kit export (a folder with its report.json), and only once the new one is complete;
    `out` may never be, contain or lie inside `base` or `adapter`. Returns the report also saved as
    out/report.json and out/report.txt.
    """
    started = time.perf_counter()
    dtype = as_dtype(dtype, "export dtype")
    if dtype not in EXPORT_DTYPES:
        raise QLoraKitError(f"export dtype {dtype_name(dtype)} is not supported: use bf16, fp16 or fp32")
    shard_limit = parse_size(max_shard_size)
    eval_file = resolve_eval_file(eval_file, adapter)
    out = Path(out)
    check_export_target(out, base, adapter, overwrite)
    job = prepare_merge(base, adapter, merge_into, quant, compute_dtype)
    shards = plan_shards(job.plan, dtype, shard_limit)
    out_bytes = total_bytes(shards)
    check_disk(out, out_bytes)

    norms: dict[str, dict] = {}
    with disk_full_as_error(out.parent, out_bytes + DISK_MARGIN, "the export", DISK_ADVICE), \
            atomic_dir(out, overwrite=overwrite) as tmp:
        source = job.merged_tensors(dtype, norms)
        with progress_bar(len(job.plan), progress) as bar:
            for index, entries in enumerate(shards):
                name = shard_name(index, len(shards))
                with ShardWriter(tmp / name, entries) as writer:
                    for key, _, _ in entries:
                        src_key, tensor = next(source)
                        assert src_key == key, (src_key, key)
                        writer.write(key, tensor)
                        bar.update(1)
                if on_shard is not None:
                    on_shard(index, len(shards), tmp / name)
        if len(shards) > 1:
            write_index(tmp, shards)
        copy_side_files(job.base, tmp, dtype)
        merged_s = time.perf_counter() - started

        report = {
            "base": str(job.base), "adapter": str(job.adapter), "out": str(out),
            "dtype": dtype_name(dtype), **job.summary(),
            "tensors": len(job.plan), "shards": len(shards),
            "base_bytes": sum(f.stat().st_size for f in job.files), "out_bytes": out_bytes,
            "delta_norms": norms, "verify": None,
        }
        if verify:
            report["verify"] = verify_export(tmp, job.base, job.adapter, job.quant, dtype, job.merge_into, job.files,
                                             job.pairs, job.lora, job.states, experts=job.experts)
        report["heldout"] = heldout_report(job, eval_file, eval_tokens)
        report["times_s"] = {"merge": round(merged_s, 3), "verify": round(time.perf_counter() - started - merged_s, 3),
                             "total": round(time.perf_counter() - started, 3)}
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.txt").write_text(format_report(report))
    return report

