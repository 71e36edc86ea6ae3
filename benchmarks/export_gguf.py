"""GGUF export of SmolLM2-135M-Instruct with a rank-16 all-linear adapter (random B, std 0.05):
file size, write and verify time, and logit error for f16, bf16 and q8_0.

    PYTHONPATH=. python benchmarks/export_gguf.py [--out /tmp/gguf-bench]

Two errors per type, relative Frobenius norm of the logits on a 2 x 32 batch of random tokens:
  vs_reference: the exporter's own check, against the adapter on the NF4 base in fp32;
  vs_safetensors: against the fp32 merged safetensors export of the same adapter, loaded by transformers.
"""

from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import torch

from qlora_kit import LoraConfig, QuantConfig, add_lora, export_gguf, export_merged, load_model, lora_layers, save_adapter
from qlora_kit import smollm2_path


def random_adapter(base: Path, out: Path, std: float = 0.05) -> None:
    """An adapter as after training (non-zero B), recorded as trained on the NF4 base."""
    model, _ = load_model(base, quant=None, load_tokenizer=False, progress=False)
    add_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)
    save_adapter(model, out, extra={"quant": QuantConfig().to_dict()})


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/gguf-bench")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    base = smollm2_path()
    random_adapter(base, root / "adapter")

    export_merged(base, root / "adapter", root / "merged-fp32", dtype="fp32", verify=False, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(str(root / "merged-fp32"), dtype=torch.float32).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    safetensors_logits = logits(merged, ids)
    del merged

    print(f"base: {base} ({sum(f.stat().st_size for f in base.glob('*.safetensors')) / 1e6:.1f} MB safetensors)")
    print(f"{'type':6s} {'size MB':>8s} {'write s':>8s} {'verify s':>9s} {'vs_reference':>13s} {'vs_safetensors':>15s}")
    for gguf_type in ("f16", "bf16", "q8_0"):
        path = root / f"smollm2-{gguf_type}.gguf"
        started = time.perf_counter()
        report = export_gguf(base, root / "adapter", path, gguf_type=gguf_type, progress=False)
        total = time.perf_counter() - started
        model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=path.name, dtype=torch.float32).eval()
        ours = logits(model, ids)
        del model
        vs_st = float(torch.linalg.vector_norm(ours - safetensors_logits) / torch.linalg.vector_norm(safetensors_logits))
        print(f"{gguf_type:6s} {path.stat().st_size / 1e6:8.1f} {report['times_s']['write']:8.1f} "
              f"{report['times_s']['verify']:9.1f} {report['verify']['logit_rel_error']:13.3e} {vs_st:15.3e}"
              f"   (total {total:.1f} s)")


if __name__ == "__main__":
    main()
