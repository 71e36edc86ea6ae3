"""Every GGUF type for SmolLM2-135M-Instruct after a short fine-tune: file size, logit error in llama.cpp
against the merged model, and held-out perplexity of what ships.

    PYTHONPATH=. python benchmarks/gguf_types.py [--out /tmp/gguf-types] [--steps 30]

The adapter: LoRA r16 on all linear layers of the NF4 base (fp32 compute), trained `--steps` steps
(batch 8, lr 1e-3) on the demo's chatterbot trivia task (qlora_kit.demo_task), whose 26 held-out
questions are the eval file. For each --gguf-type the export's own report gives the held-out
perplexity of the adapter on its NF4 base, of the fp32 merge and of the file in llama.cpp; the logit
error is the relative Frobenius norm of llama.cpp's logits against the fp32 merged model's
(transformers) on 64 random tokens. Needs llama-cpp-python (pip install 'qlora_kit[gguf]').
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import torch

from qlora_kit import export_gguf, export_merged, smollm2_path, train
from qlora_kit.datasets import write_jsonl
from qlora_kit.demo_task import SYSTEM, task_records
from qlora_kit.export.llamacpp import LlamaCpp

TYPES = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")


def fine_tune(base: Path, root: Path, steps: int) -> Path:
    train_records, held_out = task_records()
    write_jsonl(train_records, root / "train.jsonl")
    write_jsonl(held_out, root / "eval.jsonl")
    result = train({"model": {"path": str(base)}, "quant": {"compute_dtype": "fp32"},
                    "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
                    "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_seq_len": 128},
                    "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 3,
                              "eval_every": steps, "save_every": steps},
                    "output": {"dir": str(root / "run")}}, progress=False)
    print(f"adapter: {steps} steps, held-out loss {result.eval_before:.3f} -> {result.eval_after:.3f}")
    return result.adapter_dir


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/gguf-types")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base = smollm2_path()
    adapter = fine_tune(base, root, args.steps)

    export_merged(base, adapter, root / "merged", dtype="fp32", verify=False, eval_file=False, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(str(root / "merged"), dtype=torch.float32).eval()
    ids = torch.randint(0, merged.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        reference = merged(torch.tensor([ids])).logits[0].float()
    del merged

    rows = []
    for gguf_type in TYPES:
        path = root / f"smollm2-{gguf_type}.gguf"
        report = export_gguf(base, adapter, path, gguf_type=gguf_type, verify=False, eval_file=root / "eval.jsonl",
                             progress=False)
        with LlamaCpp(path, n_ctx=64) as model:
            logits = torch.from_numpy(model.logits(ids))
        error = float(torch.linalg.vector_norm(logits - reference) / torch.linalg.vector_norm(reference))
        h = report["heldout"]
        rows.append((gguf_type, path.stat().st_size / 1e6, error, h["gguf"], h["merged"], h["adapter"]))
        if gguf_type == "q4_k_m":
            with LlamaCpp(path, n_ctx=256) as model:
                reply = model.llm.create_chat_completion(
                    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}],
                    max_tokens=24, temperature=0.0)["choices"][0]["message"]["content"]
            print(f"q4_k_m in llama.cpp, chat: {reply!r}")
    d = h["data"]
    print(f"held-out: {d['examples']} examples, {d['scored_tokens']} scored tokens; adapter on NF4 base "
          f"{rows[0][5]:.3f}, fp32 merge {rows[0][4]:.3f}")
    print(f"| type | size MB | logit rel. error vs merged (llama.cpp) | held-out perplexity (llama.cpp) |")
    print("|---|---|---|---|")
    for gguf_type, size, error, ppl, _, _ in rows:
        print(f"| {gguf_type} | {size:.1f} | {error:.2e} | {ppl:.3f} |")


if __name__ == "__main__":
    main()
