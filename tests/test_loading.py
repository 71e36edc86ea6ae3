"""load_model: streaming quantised loading, frozen base, clear errors."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_kit import QLoraKitError, QuantConfig, QuantLinear, load_model
from qlora_kit.quant import fast_dtype, roundtrip


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "llama-tied"])
def test_loads_quantised_and_frozen_with_bf16_rest(tiny_dirs, arch):
    path = tiny_dirs(arch)
    model, tok = load_model(path, quant=QuantConfig(compute_dtype=torch.bfloat16), progress=False)
    quantised = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantised) == 2 * 7
    assert not any("lm_head" in n for n in quantised)
    assert all(not p.requires_grad for p in model.parameters())
    packed = {id(m.weight) for m in model.modules() if isinstance(m, QuantLinear)}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if id(p) not in packed)  # never upcast
    auto, _ = load_model(path, progress=False)  # "auto": bf16 where the hardware is fast at it, else fp32
    assert auto.get_input_embeddings().weight.dtype == fast_dtype("cpu")
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if arch == "llama-tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok is not None and tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-tied"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_model_equals_its_dequantised_twin(tiny_dirs, arch, bits):
    """The loaded model computes exactly what transformers computes with W replaced by dequant(quant(W))."""
    path = tiny_dirs(arch)
    cfg = QuantConfig(bits=bits, compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    plain_logits_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                m.weight.copy_(roundtrip(m.weight, cfg))
    model, _ = load_model(path, quant=cfg, progress=False)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        a, b, plain = ref(ids).logits, model(ids).logits, plain_logits_model(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(b, plain, atol=1e-3)  # really quantised


def test_unquantised_load_matches_transformers(tiny_dir):
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model, _ = load_model(tiny_dir, quant=None, dtype=torch.float32, progress=False)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_missing_path(tmp_path):
    with pytest.raises(QLoraKitError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(QLoraKitError, match="no config.json"):
        load_model(tmp_path)


def test_pickle_only_folder_refused(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(QLoraKitError, match="never unpickles"):
        load_model(tmp_path)


def test_truncated_safetensors(tiny_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QLoraKitError, match="truncated or corrupt"):
        load_model(bad, progress=False)


def test_garbage_safetensors(tiny_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(QLoraKitError, match="safetensors"):
        load_model(bad, progress=False)


def test_config_and_weights_disagree(tiny_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QLoraKitError, match="shape"):
        load_model(bad, progress=False)


def test_remote_code_off_by_default(tiny_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "my_custom_model"
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(QLoraKitError):
        load_model(bad, progress=False)
