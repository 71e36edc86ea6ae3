"""Benchmark: streaming merged export of a Llama-2-7B-shaped checkpoint, against a plain file copy.

    python benchmarks/export_7b.py [--cache DIR] [--merge-into dequantized original] [--skip-small]

1. Writes (once, reused afterwards) a random bf16 checkpoint with Llama-2-7B's shapes (hidden 4096,
   32 layers, 32 heads, intermediate 11008, vocab 32000; one safetensors file per layer, about
   12.6 GiB), written one layer at a time so the model is never in memory, plus a random rank-16
   adapter on all seven projections (non-zero B, so the merge does real work).
2. For each merge base, runs `qlora_kit.export_merged(..., verify=False)` in a child process and
   records its wall time and peak RSS (from os.wait4, the child's own ru_maxrss), then copies the
   same checkpoint with a plain file copy (also in a child, also fsynced) and prints the ratio of
   the two throughputs.
3. On SmolLM2-135M (or a tiny model with --small tiny) compares the export with the usual route
   (transformers BitsAndBytesConfig 4-bit load, dequantize, peft merge_and_unload, save_pretrained).

Page cache: the copy and the export read the same files, so whichever runs second would read from
memory. Before every timed run the checkpoint's pages are evicted with
posix_fadvise(POSIX_FADV_DONTNEED) (no root needed), and both writers fsync their output, so both
read from disk and both pay for writing to it. Prints one JSON object; never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLAMA2_7B = dict(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000)
PROJECTIONS = {  # module -> (out_features, in_features) as multiples of (hidden, intermediate)
    "self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "h"), "self_attn.v_proj": ("h", "h"),
    "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("i", "h"), "mlp.up_proj": ("i", "h"),
    "mlp.down_proj": ("h", "i"),
}
GIB = 2 ** 30


def default_cache() -> Path:
    root = os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora_kit")
    return Path(root) / "bench"


# ---------------------------------------------------------------- the checkpoint and the adapter

def write_checkpoint(folder: Path, hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> Path:
    """A random bf16 Llama checkpoint, one file per layer; skipped when a finished one is there."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "DONE").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=intermediate, vocab_size=vocab,
                         tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(folder)
    dims = {"h": hidden, "i": intermediate}
    g = torch.Generator().manual_seed(0)
    n_files = layers + 2
    weight_map: dict[str, str] = {}
    total = 0

    def save(index: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{index:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    save(1, {"model.embed_tokens.weight": rand(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {p + m + ".weight": rand(dims[o], dims[n]) for m, (o, n) in PROJECTIONS.items()}
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        save(i + 2, tensors)
        del tensors
        print(f"  wrote layer {i + 1}/{layers}", file=sys.stderr, flush=True)
    save(n_files, {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   "lm_head.weight": rand(vocab, hidden)})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "DONE").write_text("ok\n")
    return folder


def write_adapter(folder: Path, hidden: int, layers: int, intermediate: int, r: int = 16) -> Path:
    """A random rank-r adapter on all seven projections, in PEFT's layout with qlora_kit's metadata."""
    import torch

    from qlora_kit import Adapter, LoraConfig, QuantConfig
    from qlora_kit.adapters import CONFIG_NAME

    if (folder / CONFIG_NAME).is_file():
        return folder
    dims = {"h": hidden, "i": intermediate}
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for m, (o, n) in PROJECTIONS.items():
            name = f"model.layers.{i}.{m}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(r, dims[n], generator=g) / math.sqrt(dims[n])
            tensors[f"{name}.lora_B.weight"] = torch.randn(dims[o], r, generator=g) * 0.01
    targets = sorted({m.rsplit(".", 1)[-1] for m in PROJECTIONS})
    return Adapter(LoraConfig(r=r, alpha=2 * r), tensors, QuantConfig(), target_modules=targets).write(folder)


def write_small_adapter(folder: Path, base: Path, r: int = 16) -> Path:
    """A qlora_kit adapter on the small model's 4-bit base, all linear layers, random non-zero B."""
    import torch

    from qlora_kit import LoraConfig, add_lora, load_model, lora_layers, save_adapter

    if (folder / "adapter_config.json").is_file():
        return folder
    model, _ = load_model(base, load_tokenizer=False, progress=False)
    add_lora(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.01)
    save_adapter(model, folder)
    return folder


# ---------------------------------------------------------------- measuring children

def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache, so the next reader goes to disk."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python; its wall time and its own peak RSS (ru_maxrss of that child)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, *args], env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed ({os.waitstatus_to_exitcode(status)}): {code[:80]}...")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


COPY = """
import os, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True)
for f in sorted(src.iterdir()):
    if f.is_file():
        shutil.copyfile(f, dst / f.name)
        fd = os.open(dst / f.name, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

EXPORT = """
import sys
from qlora_kit import export_merged
export_merged(sys.argv[1], sys.argv[2], sys.argv[3], merge_into=sys.argv[4], verify=False, progress=False)
"""

USUAL = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, device_map="cpu")
model = model.dequantize()
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], safe_serialization=True)
"""


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def compare_with_copy(base: Path, adapter: Path, scratch: Path, merge_bases: list[str]) -> dict:
    result = {"checkpoint_bytes": folder_bytes(base)}
    evict(base)
    copy = measure(COPY, str(base), str(scratch / "copy"))
    shutil.rmtree(scratch / "copy")
    copy["gib_per_s"] = round(result["checkpoint_bytes"] / GIB / copy["wall_s"], 3)
    result["file_copy"] = copy
    for merge_into in merge_bases:
        evict(base)
        out = scratch / f"export-{merge_into}"
        run = measure(EXPORT, str(base), str(adapter), str(out), merge_into)
        run["out_bytes"] = folder_bytes(out)
        run["gib_per_s"] = round(result["checkpoint_bytes"] / GIB / run["wall_s"], 3)
        run["throughput_vs_copy"] = round(copy["wall_s"] / run["wall_s"], 3)
        run["report"] = {k: v for k, v in json.loads((out / "report.json").read_text()).items()
                         if k in ("shards", "tensors", "adapted_modules", "times_s", "merge_into")}
        shutil.rmtree(out)
        result[f"export_{merge_into}"] = run
    return result


def compare_with_usual(base: Path, adapter: Path, scratch: Path) -> dict:
    result = {"model": str(base), "checkpoint_bytes": folder_bytes(base)}
    for name, code, args in [("export_dequantized", EXPORT, ["dequantized"]), ("usual_route", USUAL, [])]:
        evict(base)
        out = scratch / name
        result[name] = measure(code, str(base), str(adapter), str(out), *args)
        shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the checkpoint is kept (reused)")
    parser.add_argument("--scratch", type=Path, help="where outputs are written and removed (default: CACHE/scratch)")
    parser.add_argument("--merge-into", nargs="+", default=["dequantized", "original"])
    parser.add_argument("--small", default="smollm2", help="'smollm2', 'none', or a model folder")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    scratch = args.scratch or args.cache / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    figures: dict = {"cpu_count": os.cpu_count()}
    if not args.skip_7b:
        base = write_checkpoint(args.cache / "llama2-7b-shaped", **LLAMA2_7B)
        adapter = write_adapter(args.cache / "llama2-7b-shaped-adapter-r16", LLAMA2_7B["hidden"],
                                LLAMA2_7B["layers"], LLAMA2_7B["intermediate"])
        figures["llama2_7b_shaped"] = compare_with_copy(base, adapter, scratch, args.merge_into)
    if args.small != "none":
        from qlora_kit.models import resolve_model_path

        small = resolve_model_path(args.small)
        adapter = write_small_adapter(args.cache / f"{small.name}-adapter-r16", small)
        figures["small_model"] = compare_with_usual(small, adapter, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
