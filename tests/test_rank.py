"""Rank report: spectra from QR factors match the dense product, and a known rank is recovered."""

import json

import torch

from qlora_kit import LoraConfig, QuantConfig, add_lora, load_model, rank_report, save_adapter
from qlora_kit.adapters import Adapter
from qlora_kit.cli import main as cli_main
from qlora_kit.rank import energy_rank, product_singular_values


def synthetic_adapter(folder, true_rank=3, r=8, d=96, k=64):
    """An adapter whose scale*B@A has rank `true_rank` in every module, with known singular values."""
    g = torch.Generator().manual_seed(0)
    config = LoraConfig(r=r, alpha=2 * r)
    tensors, modules = {}, ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    for name in modules:
        b = torch.randn(d, true_rank, generator=g) @ torch.randn(true_rank, r, generator=g)
        tensors[f"{name}.lora_A.weight"] = torch.randn(r, k, generator=g)
        tensors[f"{name}.lora_B.weight"] = b
    Adapter(config, tensors, target_modules=["q_proj", "up_proj"]).write(folder)
    return config, {f"base_model.model.{k}": v for k, v in tensors.items()}


def test_qr_spectrum_equals_dense_svd():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 50, generator=g), torch.randn(70, 6, generator=g)
    dense = torch.linalg.svdvals(2.5 * b @ a)[:6]
    assert torch.allclose(product_singular_values(a, b, 2.5), dense, rtol=1e-4)


def test_energy_rank():
    s = torch.tensor([3.0, 1.0, 0.1, 0.0])  # energies 9, 1, 0.01 of 10.01
    assert energy_rank(s, 0.90) == 2 and energy_rank(s, 0.99) == 2 and energy_rank(s, 0.9995) == 3
    assert energy_rank(torch.zeros(4), 0.9) == 0


def test_synthetic_adapter_of_known_rank_is_recovered(tmp_path):
    config, tensors = synthetic_adapter(tmp_path / "a")
    report = rank_report(tmp_path / "a")
    assert report["r"] == 8 and report["max_rank_99"] == 3 and report["suggested_r"] == 4
    for name, m in report["modules"].items():
        values = torch.tensor(m["singular_values"])
        assert m["rank_99"] == 3 and m["rank_90"] <= 3
        assert float(values[3:].max()) < 1e-4 * float(values[0])
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert torch.allclose(values[:3], torch.linalg.svdvals(config.scale * b @ a)[:3], rtol=1e-4)


def test_full_rank_adapter_suggests_a_larger_r(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir, quant=QuantConfig(compute_dtype=torch.float32), load_tokenizer=False, progress=False)
    add_lora(model, LoraConfig(r=4, init="svd"))  # top singular triplets of random weights: all of r used
    save_adapter(model, tmp_path / "a")
    report = rank_report(tmp_path / "a")
    assert report["saturated_modules"] > 0 and report["suggested_r"] == 8
    change = rank_report(tmp_path / "a", change=True)  # nothing trained yet: the change is zero
    assert change["max_rank_99"] == 0


def test_cli_prints_json_and_writes_a_png(tmp_path, capsys):
    synthetic_adapter(tmp_path / "a")
    assert cli_main(["rank-report", str(tmp_path / "a"), "--json", "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[:out.rindex("}") + 1])
    assert report["suggested_r"] == 4
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["rank-report", str(tmp_path / "a")]) == 0
    assert "suggested r for the next run: 4" in capsys.readouterr().out
    assert cli_main(["rank-report", str(tmp_path / "a"), "--change"]) == 2  # starts from zero: a clear error
