"""Adapter files in PEFT's layout, read and written both ways."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_kit import (LoraConfig, QLoraKitError, QuantConfig, add_lora, load_adapter, load_model, lora_layers,
                       lora_state_dict, save_adapter)
from qlora_kit.record import record_of

FP32 = QuantConfig(compute_dtype=torch.float32)


def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def ids():
    return torch.randint(4, 320, (2, 10), generator=torch.Generator().manual_seed(0))


def test_layout_and_key_names(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir, quant=FP32, progress=False)
    add_lora(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = sorted(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("bits", [4, 8, None], ids=["4bit", "8bit", "unquantised"])
def test_save_load_roundtrip_exact(tiny_dir, tmp_path, bits, any_dtype):
    quant = None if bits is None else QuantConfig(bits=bits, compute_dtype=any_dtype)
    model, _ = load_model(tiny_dir, quant=quant, dtype=any_dtype, progress=False)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    randomise(model)
    save_adapter(model, tmp_path / "a")
    fresh, _ = load_model(tiny_dir, quant=quant, dtype=any_dtype, progress=False)
    load_adapter(fresh, tmp_path / "a")
    for (k, a), (_, b) in zip(lora_state_dict(model).items(), lora_state_dict(fresh).items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, fresh(ids()).logits)


def test_our_adapter_loads_in_peft_with_same_logits(tiny_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = tiny_dirs("qwen2")
    model, _ = load_model(path, quant=None, dtype=torch.float32, progress=False)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
    randomise(model)
    save_adapter(model, tmp_path / "ours")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids()).logits, model(ids()).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_trained_adapter_loads_with_same_logits(tiny_dir, tmp_path, rslora):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, use_rslora=rslora,
                                                     target_modules=["q_proj", "k_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # a few real steps, so lora_B is non-zero
        x = ids()
        peft_model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(tmp_path / "theirs")
    peft_model.eval()
    model, _ = load_model(tiny_dir, quant=None, dtype=torch.float32, progress=False)
    load_adapter(model, tmp_path / "theirs")
    assert len(lora_layers(model)) == 6
    assert record_of(model).lora.rslora is rslora
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, peft_model(ids()).logits, rtol=1e-5, atol=1e-5)


def test_adapter_from_other_model_names_mismatch(tiny_dirs, tmp_path):
    big, _ = load_model(tiny_dirs("llama", hidden=96, heads=4), quant=FP32, progress=False)
    add_lora(big, LoraConfig(r=4))
    save_adapter(big, tmp_path / "a")
    small, _ = load_model(tiny_dirs("llama"), quant=FP32, progress=False)
    with pytest.raises(QLoraKitError, match=r"does not fit this model .*model.layers.0.*does not fit the base weight"):
        load_adapter(small, tmp_path / "a")


def test_adapter_with_modules_base_lacks(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir, quant=FP32, progress=False)
    add_lora(model, LoraConfig(r=4))
    save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(f)
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(t, f)
    fresh, _ = load_model(tiny_dir, quant=FP32, progress=False)
    with pytest.raises(QLoraKitError, match="model.layers.7.self_attn.q_proj"):
        load_adapter(fresh, tmp_path / "a")


def test_adapter_rank_differs_from_model_adapters(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir, quant=FP32, progress=False)
    add_lora(model, LoraConfig(r=4))
    save_adapter(model, tmp_path / "a")
    other, _ = load_model(tiny_dir, quant=FP32, progress=False)
    add_lora(other, LoraConfig(r=8))
    with pytest.raises(QLoraKitError, match="another rank"):
        load_adapter(other, tmp_path / "a")


def test_not_an_adapter_folder(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir, quant=FP32, progress=False)
    with pytest.raises(QLoraKitError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(QLoraKitError, match="safe_serialization"):
        load_adapter(model, tmp_path)


def test_save_without_adapters(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir, quant=FP32, progress=False)
    with pytest.raises(QLoraKitError, match="add_lora"):
        save_adapter(model, tmp_path / "a")
