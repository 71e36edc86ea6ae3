"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) in 4-bit: load through transformers'
checkpoint conversion, expert LoRA in PEFT's layout, training, and merged export in the checkpoint's
own per-expert layout. Tiny random models: 4 experts, top-2."""

import json

import pytest
import torch
from safetensors import safe_open

from qlora_kit import LoraConfig, QuantConfig, add_lora, load_adapter, load_model, save_adapter
from qlora_kit.adapt import merge_lora, merged_state_dict
from qlora_kit.errors import QLoraKitError
from qlora_kit.export import export_merged
from qlora_kit.lora import expert_loras
from qlora_kit.moe import MoeExperts, moe_experts
from qlora_kit.quant import QuantLinear

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 320, (2, 12), generator=torch.Generator().manual_seed(seed))


def load(folder, dtype, quant: bool = True):
    q = QuantConfig(compute_dtype=dtype) if quant else None
    model, _ = load_model(folder, quant=q, dtype=dtype, load_tokenizer=False, progress=False)
    return model


def keys(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def train(model, steps: int = 4) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids(1), labels=ids(1)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", MOE)
def test_experts_quantised_router_not(tiny_dirs, arch):
    model = load(tiny_dirs(arch), torch.float32)
    experts = moe_experts(model)
    assert len(experts) == 2  # one per layer
    for m in experts.values():
        assert all(isinstance(layer, QuantLinear) for p in m.params for layer in getattr(m, p))
    mlp = model.model.layers[0].mlp
    assert mlp.gate.weight.dtype == torch.float32 and not mlp.gate.weight.requires_grad  # router: plain, frozen
    if arch == "qwen2_moe":
        assert isinstance(mlp.shared_expert.down_proj, QuantLinear) and isinstance(mlp.shared_expert_gate, QuantLinear)


@pytest.mark.parametrize("arch", MOE)
def test_unquantised_load_computes_what_transformers_computes(tiny_dirs, arch):
    from transformers import AutoModelForCausalLM

    folder = tiny_dirs(arch)
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = load(folder, torch.float32, quant=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()).logits, theirs(ids()).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", MOE)
def test_quantised_experts_compute_their_dequantised_twin(tiny_dirs, arch, dtype):
    """The 4-bit model and a plain transformers model holding its dequantised weights agree (fp32: to
    rounding; bf16: both compute in bf16, the twin with a fused expert matmul)."""
    model = load(tiny_dirs(arch), dtype)
    twin = merge_lora(model, dtype)
    with torch.no_grad():
        ours, theirs = model(ids()).logits.float(), twin(ids()).logits.float()
    error = float((ours - theirs).norm() / theirs.norm())
    assert error < (1e-5 if dtype == torch.float32 else 2e-2), error


@pytest.mark.parametrize("arch", MOE)
def test_train_save_load_with_expert_lora(tiny_dirs, tmp_path, arch, dtype):
    folder = tiny_dirs(arch)
    model = load(folder, dtype)
    router = model.model.layers[0].mlp.gate.weight.clone()
    packed = model.model.layers[0].mlp.experts.gate_up_proj[0].weight.clone()
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_experts=True, dtype=dtype))
    assert len(expert_loras(model)) == 4  # gate_up and down in each of 2 layers
    losses = train(model)
    assert losses[-1] < losses[0] - 0.3, losses
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)  # the router stays frozen
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj[0].weight, packed)
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    again = load_adapter(load(folder, dtype), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids()).logits, model(ids()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", MOE)
def test_peft_loads_the_expert_adapter(tiny_dirs, tmp_path, arch):
    """PEFT (target_parameters) on the unquantised transformers model computes what we compute, fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = tiny_dirs(arch)
    model = load(folder, torch.float32, quant=False)
    add_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0, target_experts=True, dtype=torch.float32))
    with torch.no_grad():  # a trained-looking adapter: random B everywhere
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    save_adapter(model.eval(), tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ours, theirs = model(ids()).logits, peft_model(ids()).logits
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5  # measured about 2e-7


@pytest.mark.parametrize("experts", [False, True], ids=["attention-lora", "expert-lora"])
@pytest.mark.parametrize("arch", MOE)
def test_merged_export_matches_the_4bit_model_with_adapter(tiny_dirs, tmp_path, arch, experts, dtype):
    """Quantised from `dtype`; the export (fp32) against the 4-bit model + adapter run in fp32.
    Measured 5.7e-7 .. 6.6e-7 for all three families, with and without expert LoRA, fp32 and bf16."""
    folder = tiny_dirs(arch)
    model = load(folder, dtype)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_experts=experts, dtype=dtype))
    train(model, steps=2)
    save_adapter(model.eval(), tmp_path / "adapter")
    report = export_merged(folder, tmp_path / "adapter", tmp_path / "out", dtype="fp32", progress=False,
                           compute_dtype=dtype)
    assert report["verify"]["logit_rel_error"]["dequantized"] < 1e-5, report["verify"]
    assert report["verify"]["logit_rel_error"]["original"] > 1e-2  # the other base is measurably different
    assert keys(tmp_path / "out") == keys(folder)  # per-expert tensors under the checkpoint's own names


def test_merge_after_eval_train_eval(tiny_dirs, dtype):
    """bitsandbytes' CPU repack trap: eval, train, eval in one process leave the dequantised experts intact."""
    model = load(tiny_dirs("mixtral"), dtype)
    before = merged_state_dict(model)["model.layers.0.mlp.experts.gate_up_proj"]
    add_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0, target_experts=True, dtype=dtype))
    with torch.no_grad():
        model.eval()(ids())
    x = model.get_input_embeddings()(ids()).detach().requires_grad_(True)
    model.train()(inputs_embeds=x).logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the input gets its gradient through the experts
    with torch.no_grad():
        model.eval()(ids())
    after = merged_state_dict(model)["model.layers.0.mlp.experts.gate_up_proj"]
    lora = model.model.layers[0].mlp.experts.lora_gate_up_proj
    delta = torch.stack([lora.delta_weight(e) for e in range(4)])
    torch.testing.assert_close(after, before + delta, rtol=0, atol=1e-6)


def test_eight_bit_experts_train_and_export(tiny_dirs, tmp_path):
    folder = tiny_dirs("qwen2_moe")
    model = load(folder, torch.float32, quant=False)
    q, _ = load_model(folder, quant=QuantConfig(bits=8, compute_dtype=torch.float32), load_tokenizer=False,
                      progress=False)
    assert isinstance(q.model.layers[0].mlp.experts, MoeExperts)
    with torch.no_grad():
        ours, full = q(ids()).logits, model(ids()).logits
    assert float((ours - full).norm() / full.norm()) < 5e-2  # int8 rows: measured about 1e-2
    add_lora(q, LoraConfig(r=2, alpha=4, dropout=0.0, target_experts=True, dtype=torch.float32))
    train(q, steps=2)
    save_adapter(q.eval(), tmp_path / "adapter")
    report = export_merged(folder, tmp_path / "adapter", tmp_path / "out", dtype="fp32", progress=False)
    assert report["verify"]["logit_rel_error"]["dequantized"] < 1e-5, report["verify"]


def test_target_experts_errors(tiny_dirs):
    with pytest.raises(QLoraKitError, match="dropout 0"):
        LoraConfig(target_experts=True)  # default dropout 0.05
    with pytest.raises(QLoraKitError, match="init 'svd'"):
        LoraConfig(target_experts=True, dropout=0.0, init="svd")
    dense = load(tiny_dirs("llama"), torch.float32)
    with pytest.raises(QLoraKitError, match="no mixture-of-experts"):
        add_lora(dense, LoraConfig(target_experts=True, dropout=0.0))


def test_unsupported_experts_module_is_named():
    from torch import nn

    from qlora_kit.moe import check_experts_supported

    class BiasedExperts(nn.Module):  # GPT-OSS-like: biases beside the fused weights
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 4))
            self.down_proj = nn.Parameter(torch.zeros(2, 4, 4))
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(2, 8))
            self.act_fn = nn.SiLU()

    with pytest.raises(QLoraKitError, match="model.layers.0.mlp.experts .BiasedExperts. is not supported.*gate_up_proj_bias"):
        check_experts_supported("model.layers.0.mlp.experts", BiasedExperts())


def test_expert_adapter_of_another_model_does_not_fit(tiny_dirs, tmp_path):
    model = load(tiny_dirs("mixtral"), torch.float32)
    add_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0, target_experts=True, dtype=torch.float32))
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(QLoraKitError, match="does not fit this model.*experts"):
        load_adapter(load(tiny_dirs("qwen3_moe"), torch.float32), tmp_path / "adapter")


def test_checkpoint_missing_an_expert(tiny_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_dirs("mixtral"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QLoraKitError, match="model.layers.1.mlp.experts.gate_up_proj"):
        load(folder, torch.float32)


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory, tiny_dirs):
    """The tiny Qwen3-MoE written in transformers' in-memory layout: one 3-D tensor per projection."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    source = tiny_dirs("qwen3_moe")
    folder = tmp_path_factory.mktemp("fused")
    for f in source.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, folder / f.name)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_fused_checkpoint_loads_and_exports_in_its_own_layout(tiny_dirs, fused_dir, tmp_path):
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys(fused_dir)
    per_expert, fused = load(tiny_dirs("qwen3_moe"), torch.float32), load(fused_dir, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids()).logits, per_expert(ids()).logits, rtol=0, atol=0)
    add_lora(fused, LoraConfig(r=2, alpha=4, dropout=0.0, target_experts=True, dtype=torch.float32))
    train(fused, steps=2)
    save_adapter(fused.eval(), tmp_path / "adapter")
    report = export_merged(fused_dir, tmp_path / "adapter", tmp_path / "out", dtype="fp32", progress=False,
                           compute_dtype=torch.float32)
    assert report["verify"]["logit_rel_error"]["dequantized"] < 1e-5, report["verify"]
    assert keys(tmp_path / "out") == keys(fused_dir)


@pytest.mark.parametrize("arch", MOE)
def test_planner_counts_experts_as_the_model_has_them(tiny_dirs, arch):
    """Parameters against the transformers model; quantised bytes against the loaded 4-bit model."""
    from transformers import AutoModelForCausalLM

    from qlora_kit.plan import plan_memory

    folder = tiny_dirs(arch)
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    plan = plan_memory(folder, quant=QuantConfig(compute_dtype=torch.float32),
                       lora=LoraConfig(r=4, dropout=0.0, target_experts=True, dtype=torch.float32), device="cpu")
    assert plan.parameters == sum(p.numel() for p in reference.parameters())
    experts = reference.config.num_experts_per_tok
    idle = sum(p[0].numel() for n, p in reference.named_parameters() if ".experts." in n) * (4 - experts)
    assert plan.moe["active_parameters"] == plan.parameters - idle
    model = load(folder, torch.float32)
    packed = sum(m.qweight.nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    assert plan.components["quantized_weights"] + plan.components["quant_constants"] == packed
    add_lora(model, LoraConfig(r=4, dropout=0.0, target_experts=True, dtype=torch.float32))
    assert plan.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_mixtral_preset_as_published():
    """Mixtral 8x7B: 46.7B parameters, 12.9B active per token (Mistral AI's announcement)."""
    from qlora_kit.plan import plan_memory

    plan = plan_memory("mixtral-8x7b", quant=QuantConfig(compute_dtype=torch.bfloat16),
                       lora=LoraConfig(dtype=torch.bfloat16))
    assert round(plan.parameters / 1e9, 1) == 46.7 and round(plan.moe["active_parameters"] / 1e9, 1) == 12.9
    assert 21 * 2**30 < plan.moe["expert_weight_bytes"] < 22 * 2**30  # 45B expert weights at ~4.1 bits


def test_yaml_run_with_expert_lora_trains_resumable_checkpoints_and_exports(tiny_dirs, tmp_path):
    """The trainer end to end on Mixtral (bf16): `lora.target_experts: true` in the YAML sections,
    gradient checkpointing on, held-out loss falls, the run's adapter exports."""
    from test_train import make_config

    from qlora_kit.config import config_from_dict
    from qlora_kit.trainer import train as run_training

    folder = tiny_dirs("mixtral")
    raw = make_config(tmp_path, folder, "bf16", max_steps=4, eval_every=4, save_every=2, lr=1e-2)
    raw["lora"] = {"r": 4, "dropout": 0.0, "target_experts": True}
    result = run_training(config_from_dict(raw), progress=False)
    assert result.eval_after < result.eval_before - 0.3, (result.eval_before, result.eval_after)
    adapter = result.run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    report = export_merged(folder, adapter, tmp_path / "out", dtype="fp32", progress=False)
    assert report["verify"]["logit_rel_error"]["dequantized"] < 1e-5, report["verify"]


def test_stopped_and_resumed_run_with_expert_lora_equals_a_straight_run(tiny_dirs, tmp_path):
    from safetensors.torch import load_file
    from test_train import make_config

    from qlora_kit.trainer import train as run_training

    raw = make_config(tmp_path, tiny_dirs("qwen3_moe"), "fp32", max_steps=4, eval_every=100, save_every=2,
                      schedule="constant")
    raw["data"]["eval_fraction"] = 0.0
    raw["lora"] = {"r": 2, "dropout": 0.0, "target_experts": True}
    for out, steps in (("straight", 4), ("resumed", 2)):
        raw["output"]["dir"] = str(tmp_path / out)
        run_training({**raw, "train": {**raw["train"], "max_steps": steps}}, progress=False)
    run_training(raw, resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert any(".experts.base_layer.lora_B" in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapters_disabled_switches_expert_adapters_off_too(tiny_dirs):
    """The preference losses' reference model is the base with every adapter off, experts' included."""
    from qlora_kit.adapt import adapters_disabled

    model = load(tiny_dirs("qwen3_moe"), torch.float32)
    with torch.no_grad():
        base = model(ids()).logits
    add_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0, targets=["q_proj"], target_experts=True,
                               dtype=torch.float32))
    with torch.no_grad():
        for lora in expert_loras(model).values():
            lora.lora_B.weight.normal_(0, 0.1)
        adapted = model(ids()).logits
        with adapters_disabled(model):
            off = model(ids()).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(off, base, rtol=0, atol=0)
