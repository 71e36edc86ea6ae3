"""The CUDA path on one GPU: quantised layers against their dequantised twins, eval -> train -> eval ->
merge in one process, bf16 and fp16 training runs, bitsandbytes' paged 8-bit AdamW, export of a
GPU-trained adapter, and the memory planner against torch.cuda.max_memory_allocated on a 1B-shaped model.

Every test is marked `cuda` and skipped where torch sees no GPU, so a CPU run collects and skips them;
`bash scripts/gpu_check.sh` runs them (`pytest -m cuda`) with a short benchmark and one table of the
figures each test records (record_property). Every test names its compute dtype.

Tolerances come from the dtype's machine epsilon, eps = torch.finfo(dtype).eps: 2^-7 for bf16, 2^-10
for fp16 (the gap between 1 and the next number, twice the largest relative rounding error).
"""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from qlora_kit import (LoraConfig, LoraLinear, QuantConfig, QuantLinear, add_lora, export_merged, load_adapter,
                       load_model, lora_layers, merge_lora, merged_state_dict)
from qlora_kit.quant import QuantizedWeight

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (bash scripts/gpu_check.sh runs these)")]

CUDA = torch.device("cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FOUR_BIT = {
    "nf4-dq": QuantConfig(bits=4, quant_type="nf4", double_quant=True),
    "nf4": QuantConfig(bits=4, quant_type="nf4", double_quant=False),
    "fp4-dq": QuantConfig(bits=4, quant_type="fp4", double_quant=True),
    "fp4": QuantConfig(bits=4, quant_type="fp4", double_quant=False),
}
# Relative Frobenius error of dequant(quant(W)) for a normal W, measured with bitsandbytes on CPU
# (FACTS.md: NF4 0.092, FP4 0.122; double quant does not change it), plus 10%.
ROUNDTRIP_BOUND = {"nf4": 0.10, "fp4": 0.135}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    return float(torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float()))


# ---------------------------------------------------------------- quantised layers vs dequantised twins

def check_against_twin(layer: QuantLinear, dtype: torch.dtype) -> dict:
    """Forward and input gradient of `layer` against an nn.Linear holding its dequantised weight.

    Both run the same GEMM on the same weight in `dtype`; they differ only in where the bias is added
    (QuantLinear rounds x @ W.T before adding it: one more rounding) and in the kernel cuBLAS picks,
    so each output element may differ by at most eps * (|x| @ |W|.T + |b|), each input-gradient
    element by eps * (|g| @ |W|). Returns the largest error as a fraction of that bound."""
    w = layer.dequantize(dtype)
    twin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=CUDA, dtype=dtype)
    with torch.no_grad():
        twin.weight.copy_(w)
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
    twin.requires_grad_(False)
    gen = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.randn(3, 17, layer.in_features, device=CUDA, dtype=dtype, generator=gen)
    x_ours, x_twin = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_twin = layer(x_ours), twin(x_twin)
    assert y_ours.dtype == dtype and y_ours.device.type == "cuda"
    g = torch.randn(y_ours.shape, device=CUDA, dtype=dtype, generator=gen)
    y_ours.backward(g)
    y_twin.backward(g)
    assert x_ours.grad is not None and x_ours.grad.dtype == dtype and x_ours.grad.device.type == "cuda"
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    wa = w.float().abs()
    bias = 0 if layer.bias is None else layer.bias.float().abs()
    fwd_bound = (eps * (x.float().abs() @ wa.t() + bias)).clamp_min(tiny)
    bwd_bound = (eps * (g.float().abs() @ wa)).clamp_min(tiny)
    return {"forward": ((y_ours.float() - y_twin.float()).abs() / fwd_bound).max().item(),
            "backward": ((x_ours.grad.float() - x_twin.grad.float()).abs() / bwd_bound).max().item()}


def frozen_through_eval_and_train(layer: QuantLinear, dtype: torch.dtype) -> None:
    """An eval-mode no-grad forward, then a train-mode forward and backward, leave the packed weight
    and its dequantisation bit-identical (bitsandbytes' Linear4bit repacks in place on some CPUs)."""
    packed, deq = layer.weight.detach().clone(), layer.dequantize(torch.float32)
    x = torch.randn(2, 5, layer.in_features, device=CUDA, dtype=dtype)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    layer(x.clone().requires_grad_()).sum().backward()
    assert torch.equal(layer.weight, packed)
    assert torch.equal(layer.dequantize(torch.float32), deq)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", FOUR_BIT, ids=FOUR_BIT.keys())
def test_4bit_layer_matches_its_dequantised_twin(kind, dtype, record_property):
    config = replace(FOUR_BIT[kind], compute_dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(200, 256, generator=gen) * 0.05).to(dtype)   # out 200: not a multiple of 32
    b = (torch.randn(200, generator=gen) * 0.05).to(dtype)
    layer = QuantLinear.from_weight(w, config, b, device=CUDA)
    assert layer.weight.device.type == "cuda" and layer.compute_dtype == dtype

    err = check_against_twin(layer, dtype)
    roundtrip = rel(layer.dequantize(torch.float32), w.to(CUDA))
    # the exporter re-quantises on the CPU: CPU and CUDA quantisers must give the same weights
    cpu = QuantizedWeight(w, config).dequantize(torch.float32)
    differ = (layer.dequantize(torch.float32).cpu() != cpu).float().mean().item()
    record_property("fwd err/bound", f"{err['forward']:.2f}")
    record_property("bwd err/bound", f"{err['backward']:.2f}")
    record_property("roundtrip rel err", f"{roundtrip:.4f}")
    record_property("CPU!=CUDA", f"{differ:.1e}")
    assert err["forward"] <= 1.0 and err["backward"] <= 1.0
    assert roundtrip < ROUNDTRIP_BOUND[config.quant_type]
    assert differ <= 1e-3, "CUDA and CPU 4-bit quantisation disagree on more than 0.1% of the weights"
    frozen_through_eval_and_train(layer, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_8bit_layer_matches_its_dequantised_twin(dtype, record_property):
    config = QuantConfig(bits=8, compute_dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(200, 256, generator=gen) * 0.05).to(dtype)
    b = (torch.randn(200, generator=gen) * 0.05).to(dtype)
    layer = QuantLinear.from_weight(w, config, b, device=CUDA)
    assert layer.weight.dtype == torch.int8 and layer.weight.device.type == "cuda"

    err = check_against_twin(layer, dtype)
    deq = layer.dequantize(torch.float32)
    # row-wise absmax int8: each weight lies within half a step (row max / 127 / 2) of its code;
    # 0.51 allows the fp32 arithmetic of the scale
    step = w.float().abs().amax(dim=1, keepdim=True).to(CUDA) / 127
    worst = ((deq - w.float().to(CUDA)).abs() / step).max().item()
    # the exporter re-quantises on the CPU, which rounds differently: never by more than one step
    cpu = QuantizedWeight(w, config).dequantize(torch.float32)
    cpu_steps = ((deq.cpu() - cpu).abs() / step.cpu()).max().item()
    record_property("fwd err/bound", f"{err['forward']:.2f}")
    record_property("bwd err/bound", f"{err['backward']:.2f}")
    record_property("max err/step", f"{worst:.3f}")
    record_property("CPU-CUDA max steps", f"{cpu_steps:.2f}")
    assert err["forward"] <= 1.0 and err["backward"] <= 1.0
    assert worst <= 0.51
    assert cpu_steps <= 1.01
    frozen_through_eval_and_train(layer, dtype)


@pytest.mark.parametrize("shape", [(256, 200), (100, 70)], ids=["whole-blocks", "partial-block"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_sliced_quantiser_is_bit_identical_on_cuda(monkeypatch, shape, double_quant):
    """The loader quantises big weights in slices (quant.QUANT_CHUNK); on CUDA too the result must be
    bitsandbytes' own, byte for byte. Compute dtype bf16."""
    import qlora_kit.quant as quant
    from test_quant import assert_quantised_as_bitsandbytes_does

    monkeypatch.setattr(quant, "QUANT_CHUNK", 4096)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(CUDA, torch.bfloat16)
    assert w.device.type == "cuda"
    for quant_type in ("nf4", "fp4"):
        assert_quantised_as_bitsandbytes_does(w, quant_type, double_quant)


# ---------------------------------------------------------------- eval -> train -> eval -> merge

@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_eval_train_eval_merge_in_one_process(tiny_dir, dtype, record_property):
    """One process, in this order: eval logits, 3 training steps, eval logits (twice), merge, train on.

    The base never changes, eval is repeatable bit for bit, training moves the logits, and the fp32
    merge gives the logits the 16-bit model computes to within 3 eps (relative; a CPU run of the same
    check measures 0.9 eps in bf16 and fp16)."""
    model, _ = load_model(tiny_dir, quant=QuantConfig(bits=4, compute_dtype=dtype), device=CUDA, progress=False)
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.1, dtype=dtype))
    quantised = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantised and all(w.device.type == "cuda" for w in quantised.values())
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)).to(CUDA)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.device.type == "cuda" and p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)

    def logits() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(ids).logits.float()

    def train_steps(n: int) -> list[float]:
        model.train()
        losses = []
        for _ in range(n):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = [p.grad for p in params]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    before = logits()
    losses = train_steps(3)
    after, again = logits(), logits()
    merged = merge_lora(model, torch.float32)
    assert all(t.device.type == "cuda" for t in list(merged.parameters()) + list(merged.buffers()))
    with torch.no_grad():
        merged_logits = merged(ids).logits.float()
    eps = torch.finfo(dtype).eps
    moved, merge_err = rel(after, before), rel(merged_logits, after)
    record_property("losses", " ".join(f"{x:.3f}" for x in losses))
    record_property("merge rel err / eps", f"{merge_err / eps:.2f}")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert torch.equal(after, again)
    assert moved > 100 * eps, "training did not change the model's logits"
    assert merge_err < 3 * eps
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.weight, quantised[name]), f"{name}: the packed base weight changed"

    # the model is untouched by merging: training goes on, and a second merge tracks it
    train_steps(1)
    later = logits()
    state = merged_state_dict(model, torch.float32)
    merged.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert rel(merged(ids).logits.float(), later) < 3 * eps
    assert rel(later, after) > 0


# ---------------------------------------------------------------- training runs on the GPU

def write_chat_data(path: Path, n: int = 48) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                                             {"role": "assistant", "content": f"it is {i + 1}"}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def cuda_runs(tiny_dirs, tmp_path_factory):
    """run(dtype name) -> (raw config, measurement) of an 8-step qlora_kit.train on the GPU, run once."""
    cache = {}

    def run(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(f"cuda-run-{name}")
            raw = {
                "model": {"path": str(tiny_dirs("llama"))},
                "quant": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": name},
                "lora": {"r": 4, "dropout": 0.1, "dtype": name},
                "data": {"train": str(write_chat_data(root / "data.jsonl")), "max_seq_len": 48, "eval_fraction": 0.125},
                "train": {"device": "cuda", "max_steps": 8, "batch_size": 4, "lr": 5e-3, "eval_every": 4,
                          "save_every": 4, "keep_last": 1, "seed": 0},
                "output": {"dir": str(root / "run")},
            }
            cache[name] = raw, gpu_check.measure_run(raw)
        return cache[name]

    return run


@pytest.mark.parametrize("name", DTYPES)
def test_training_run_on_cuda(cuda_runs, name, record_property):
    """qlora_kit.train with train.device cuda and quant.compute_dtype bf16 / fp16: the run finishes with
    finite losses, a metrics row per step, held-out losses, an adapter, and GPU memory in the rows.
    bf16 must also learn (held-out loss falls); fp16 runs with dynamic loss scaling, whose skipped
    steps can slow the first few, so only finishing with finite numbers is asked of it."""
    raw, measured = cuda_runs(name)
    run = Path(raw["output"]["dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    record_property("losses", f"{steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}")
    record_property("eval", " -> ".join(f"{x:.3f}" for x in [measured["eval_before"], *evals]))
    record_property("peak alloc", f"{measured['peak_allocated'] / 2**20:.0f} MiB")
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in steps) and all(math.isfinite(x) for x in evals)
    assert len(evals) == 2 and math.isfinite(measured["eval_before"])
    # the trainer's mem_mb is torch.cuda.max_memory_allocated on CUDA (on a CPU it would be the RSS)
    peak = measured["peak_allocated"] + measured["baseline_allocated"]
    assert 0 < steps[-1]["mem_mb"] <= peak / 2**20 + 1e-6
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["qlora_kit"]["quant"]["compute_dtype"] == str(DTYPES[name]).removeprefix("torch.")
    if name == "bf16":
        assert measured["eval_after"] < measured["eval_before"]


def test_export_of_cuda_trained_adapter(cuda_runs, tiny_dir, tmp_path, record_property):
    """The adapter trained on the GPU in bf16, exported to fp32 with verification (on the CPU, where
    the exporter re-quantises the base): the report's error as on CPU (< 1e-4), the exported weights
    equal the GPU model's own merge except where CPU and CUDA quantisers disagree (<= 0.1% of them),
    and the export, run on the GPU in fp32, gives the logits of the 4-bit model with its adapter in
    bf16 to within 3 eps_bf16."""
    from transformers import AutoModelForCausalLM

    raw, _ = cuda_runs("bf16")
    adapter = Path(raw["output"]["dir"]) / "adapter"
    report = export_merged(tiny_dir, adapter, tmp_path / "out", dtype="fp32", verify=True, progress=False)
    v = report["verify"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == []
    assert v["logit_rel_error"]["dequantized"] < 1e-4

    model, _ = load_model(tiny_dir, quant=QuantConfig(bits=4, compute_dtype=torch.bfloat16), device=CUDA,
                          progress=False)
    load_adapter(model, adapter)
    assert lora_layers(model)
    ours = {k: t.cpu() for k, t in merged_state_dict(model, torch.float32).items()}
    exported = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        exported.update(load_file(f))
    adapted = [k.removesuffix(".lora_A.weight") + ".weight" for k in load_file(adapter / "adapter_model.safetensors")
               if k.endswith(".lora_A.weight")]
    adapted = [k.removeprefix("base_model.model.") for k in adapted]
    differ = sum(int((~torch.isclose(exported[k], ours[k], rtol=1e-5, atol=1e-6)).sum()) for k in adapted)
    total = sum(ours[k].numel() for k in adapted)

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).to(CUDA).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2)).to(CUDA)
    with torch.no_grad():
        reference = model.eval()(ids).logits.float()
        err = rel(merged(ids).logits.float(), reference)
    eps = torch.finfo(torch.bfloat16).eps
    record_property("verify rel err", f"{v['logit_rel_error']['dequantized']:.1e}")
    record_property("weights differing", f"{differ}/{total}")
    record_property("GPU logits rel err / eps", f"{err / eps:.2f}")
    assert differ <= 1e-3 * total
    assert err < 3 * eps


# ---------------------------------------------------------------- paged 8-bit AdamW

def test_paged_adamw8bit_steps_lora_params_on_the_gpu(record_property):
    """bitsandbytes' PagedAdamW8bit against torch's AdamW on the same LoRA layer (bf16 compute, r=64
    so each factor has 131,072 entries: bitsandbytes pages only tensors of 100,000 or more). Five steps
    each; the 8-bit run's total update must stay within 5% of the fp32 one (relative Frobenius; a CPU
    run of the same check measures 1.1-1.3%, the cost of storing both moments in 8 bits)."""
    import bitsandbytes as bnb

    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    base = QuantLinear.from_weight((torch.randn(2048, 2048, generator=gen) * 0.02).to(dtype),
                                   QuantConfig(bits=4, compute_dtype=dtype), device=CUDA)

    def lora() -> LoraLinear:
        layer = LoraLinear(base, r=64, alpha=128, dropout=0.0, dtype=dtype, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # a non-zero B, so both factors get gradients from the first step
            b = torch.randn(layer.lora_B.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.01
            layer.lora_B.weight.copy_(b)
        return layer

    paged, plain = lora(), lora()
    x = torch.randn(4, 64, 2048, generator=gen).to(CUDA, dtype)
    target = (torch.randn(4, 64, 2048, generator=gen) * 0.1).to(CUDA)
    p8, p32 = [paged.lora_A.weight, paged.lora_B.weight], [plain.lora_A.weight, plain.lora_B.weight]
    start = [p.detach().clone() for p in p8]
    settings = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt8, opt32 = bnb.optim.PagedAdamW8bit(p8, **settings), torch.optim.AdamW(p32, **settings)
    losses = {"8bit": [], "fp32": []}
    for _ in range(5):
        for key, layer, opt in (("8bit", paged, opt8), ("fp32", plain, opt32)):
            loss = F.mse_loss(layer(x).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[key].append(loss.item())
    torch.cuda.synchronize()
    for p in p8:
        assert p.device.type == "cuda" and p.dtype == torch.float32
        state = opt8.state[p]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
        assert getattr(state["state1"], "is_paged", False), "the optimiser state was not paged"
    drift = max(rel(a.detach() - s, b.detach() - s) for a, b, s in zip(p8, p32, start))
    record_property("update rel diff", f"{drift:.4f}")
    record_property("loss 8bit", f"{losses['8bit'][0]:.4f} -> {losses['8bit'][-1]:.4f}")
    assert losses["8bit"][-1] < losses["8bit"][0]
    assert drift < 0.05


# ---------------------------------------------------------------- the planner on a 1B-shaped model

def test_planner_against_cuda_peak_on_1b_shaped_model(tmp_path, record_property):
    """The planner's prediction against a real qlora_kit.train run on the GPU: a random 0.84B Llama
    (TinyLlama-1.1B's widths, 16 layers), NF4 + dq, bf16 compute, LoRA r16 on all linear layers,
    batch 4 x 1024, gradient checkpointing, paged 8-bit AdamW, 3 steps (the optimiser state exists
    from step 2 on).

    Tensors: the plan without its overhead line against torch.cuda.max_memory_allocated. Whole plan:
    against max_memory_reserved + the CUDA context. The overhead line's CUDA terms (512 MiB context,
    20% fragmentation) are assumptions not yet measured, so both bounds are a generous 25%."""
    folder = gpu_check.model_folder(tmp_path / "models")
    data = gpu_check.write_token_data(tmp_path / "train.jsonl", seq=1024, rows=4 * 3)
    raw = gpu_check.run_config(folder, data, tmp_path / "run", "bf16", batch=4, seq=1024, steps=3)
    plan = gpu_check.plan_for(raw)
    measured = gpu_check.measure_run(raw)
    c = gpu_check.compare(plan, measured)
    record_property("peak alloc", f"{measured['peak_allocated'] / 2**30:.2f} GiB")
    record_property("plan w/o overhead", f"{c['plan_tensors'] / 2**30:.2f} GiB ({100 * c['error_tensors']:+.1f}%)")
    record_property("reserved+context", f"{measured['peak_with_context'] / 2**30:.2f} GiB")
    record_property("plan", f"{c['plan_total'] / 2**30:.2f} GiB ({100 * c['error_total']:+.1f}%)")
    record_property("context", f"{measured['context'] / 2**20:.0f} MiB")
    assert all(math.isfinite(x) for x in measured["losses"]) and measured["steps"] == 3
    assert abs(c["error_tensors"]) <= 0.25
    assert abs(c["error_total"]) <= 0.25
