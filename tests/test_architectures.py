"""Issue 15's table, end to end through the public API, for every tiny architecture in tiny.ARCHS:
4-bit load (fp32 compute), LoRA on all linear layers (and, for the MoEs, on the experts too), a few
training steps with the trainer's loss, adapter saved, merged fp32 export read by plain transformers,
f16 GGUF read back by the `gguf` package and, where llama_cpp is installed, run in llama.cpp.

Measured (relative Frobenius error of the logits; print them with
`PYTHONPATH=$PWD python -m pytest -s -q tests/test_architectures.py`):

    case                     merged fp32 vs 4-bit + adapter   llama.cpp f16 vs merged
    llama                    6.6e-07                          1.0e-03
    mistral                  6.6e-07                          1.0e-03
    qwen2                    6.5e-07                          9.5e-04
    llama-tied               6.8e-07                          1.1e-03
    gemma                    3.2e-07                          5.2e-04
    gemma2                   5.5e-07                          8.3e-04
    granite                  4.9e-07                          7.7e-04
    qwen3                    7.1e-07                          1.2e-03
    gemma3_text              5.4e-07                          8.3e-04
    phi3                     5.8e-07                          9.6e-04
    olmo2                    7.6e-07                          1.1e-03
    llama3-rope              7.7e-07                          1.1e-03
    mixtral                  5.4e-07                          8.4e-04
    qwen2_moe                5.5e-07                          7.4e-04
    qwen3_moe                6.1e-07                          1.1e-03
    mixtral-expert-lora      5.9e-07                          8.1e-04
    qwen2_moe-expert-lora    5.7e-07                          7.9e-04
    qwen3_moe-expert-lora    6.3e-07                          1.0e-03

(tolerances: 1e-5 and issue 15's 3e-2. The tiny mistral has llama's weights: same seed, and with no
sliding window the same computation. 18 cases in about 60 s on 2 busy cores, 44 s of CPU time.)
"""

import pytest
import torch
from gguf import GGUFReader

import qlora_kit as qk
from qlora_kit.losses import causal_lm_loss
from tiny import ARCHS

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
CASES = [pytest.param(arch, False, id=arch) for arch in ARCHS] + \
        [pytest.param(arch, True, id=f"{arch}-expert-lora") for arch in MOE]
# llama.cpp's architecture names, written out so the test does not read them from the code it checks
LLAMA_CPP_ARCH = {"llama": "llama", "mistral": "llama", "llama-tied": "llama", "llama3-rope": "llama",
                  "mixtral": "llama", "granite": "granite", "qwen2": "qwen2", "qwen2_moe": "qwen2moe", "qwen3": "qwen3",
                  "qwen3_moe": "qwen3moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
                  "phi3": "phi3", "olmo2": "olmo2"}
FP32 = torch.float32
# merged fp32 export against the 4-bit model + adapter in fp32: the same dequantised weights plus the
# same B @ A, summed in another order (measured below 1e-6 for every architecture)
MERGED_TOLERANCE = 1e-5
# f16 GGUF in llama.cpp against the fp32 merged model: issue 15's bound
LLAMA_CPP_TOLERANCE = 3e-2
QUIET = dict(progress=False)


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(ours - reference) / torch.linalg.vector_norm(reference))


def train_steps(model, steps: int = 3) -> list[float]:
    """AdamW steps on one tiny batch with the trainer's loss; asserts every adapter's gradient is
    finite (and non-zero for every B, whose gradient does not wait on B)."""
    batch = torch.randint(4, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params), sorted(params)[:4]
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    losses = []
    for step in range(steps):
        loss, _ = causal_lm_loss(model, batch, batch)
        loss.backward()
        for n, p in params.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            if step == 0 and "lora_B" in n:
                assert p.grad.abs().sum() > 0, f"{n} got a zero gradient"
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    for n, p in params.items():
        if "lora_B" in n:
            assert p.abs().sum() > 0, f"{n} did not move from zero"
    return losses


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("architectures")


@pytest.mark.parametrize("arch,experts", CASES)
def test_load_train_merge_gguf_llama_cpp(tiny_dirs, root, arch, experts):
    from transformers import AutoModelForCausalLM

    case = root / (arch + ("-expert-lora" if experts else ""))
    base = tiny_dirs(arch)
    # 1. load in 4 bits, adapt, train
    model, _ = qk.load_model(base, qk.QuantConfig(bits=4, compute_dtype=FP32), load_tokenizer=False, **QUIET)
    qk.add_lora(model, qk.LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear", target_experts=experts,
                                     dtype=FP32))
    losses = train_steps(model)
    assert losses[-1] < losses[0], losses

    # 2. adapter saved, merged fp32 export against the 4-bit model + adapter
    ids = torch.randint(4, 320, (16,), generator=torch.Generator().manual_seed(7)).tolist()
    model.eval()
    with torch.no_grad():
        adapted = model(torch.tensor([ids])).logits[0].float()
    qk.save_adapter(model, case / "adapter")
    del model
    qk.export_merged(base, case / "adapter", case / "merged", dtype="fp32", verify=False, **QUIET)
    merged_model = AutoModelForCausalLM.from_pretrained(str(case / "merged"), dtype=FP32).eval()
    with torch.no_grad():
        merged = merged_model(torch.tensor([ids])).logits[0].float()
    del merged_model
    merged_error = rel_error(merged, adapted)

    # 3. f16 GGUF, read back; run in llama.cpp where it is installed.
    # a neutral file name: llama.cpp and transformers special-case some names ("phi3", "mistral")
    out = case / "gguf" / "exported.gguf"
    out.parent.mkdir()
    qk.export_gguf(base, case / "adapter", out, gguf_type="f16", verify=False, **QUIET)
    reader = GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == LLAMA_CPP_ARCH[arch]
    assert len(reader.tensors) > 0
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    gguf_error = float("nan")
    if llama_cpp is not None:
        llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
        llm.eval(ids)
        ours = torch.tensor(llm.scores[: len(ids)], dtype=FP32)
        del llm
        gguf_error = rel_error(ours, merged)
    print(f"\n{case.name:21s} loss {losses[0]:.3f} -> {losses[-1]:.3f}  merged vs 4-bit+adapter {merged_error:.1e}"
          f"  llama.cpp f16 vs merged {gguf_error:.1e}")
    assert merged_error < MERGED_TOLERANCE
    if llama_cpp is None:
        pytest.skip("llama_cpp is not installed: the GGUF was read back but not run")
    assert gguf_error < LLAMA_CPP_TOLERANCE
