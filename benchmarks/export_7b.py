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
    from safetensors.torch import save_file

    from qlora_kit import LoraConfig, QuantConfig
    from qlora_kit.adapters import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, peft_config_dict

    if (folder / CONFIG_NAME).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    dims = {"h": hidden, "i": intermediate}
    g = torch.Generator().manual_seed(1)
    tensors, modules = {}, []
    for i in range(layers):
        for m, (o, n) in PROJECTIONS.items():
            name = f"model.layers.{i}.{m}"
            modules.append(name)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.randn(r, dims[n], generator=g) / math.sqrt(dims[n])
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.randn(dims[o], r, generator=g) * 0.01
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = peft_config_dict(LoraConfig(r=r, alpha=2 * r), modules, None, {"quant": QuantConfig().to_dict()})
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return folder
