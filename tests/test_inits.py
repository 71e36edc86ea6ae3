"""Adapter initialisations: what each one starts from, and that training, saving, loading and export stay exact."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import (LoraConfig, QLoraKitError, QuantConfig, add_lora, export_merged, load_adapter, load_model,
                       lora_layers, save_adapter, to_plain_lora)
from qlora_kit.config import LoraSection
from qlora_kit.adapters import INIT_FILE
from qlora_kit.inits import top_singular
from qlora_kit.lora import INITS
from qlora_kit.record import record_of
from qlora_kit.lora import lora_delta
from qlora_kit.quant import roundtrip

FP32 = torch.float32


def ids(vocab=320):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


def load(base, dtype=FP32, bits=4):
    """The tiny model with `bits`-bit linear weights (None: unquantised), computing in `dtype`."""
    quant = None if bits is None else QuantConfig(bits=bits, compute_dtype=dtype)
    return load_model(base, quant=quant, dtype=dtype, load_tokenizer=False, progress=False)[0]


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits.float()


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def train_steps(model, steps=3):
    """A few real AdamW steps on a next-token loss; returns the final loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = ids()
    for _ in range(steps):
        out = model(x).logits
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("init", INITS)
def test_each_init_trains_saves_loads_and_exports(tiny_dir, tmp_path, init, bits, any_dtype):
    if init == "loftq" and bits == 8:
        pytest.skip("covered by the 4-bit case; LoftQ on int8 is the same code path")
    dtype = any_dtype
    model = load(tiny_dir, dtype, bits)
    assert {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()} == {dtype}
    add_lora(model, LoraConfig(r=4, dropout=0.0, init=init, seed=7))
    layer = next(iter(lora_layers(model).values()))
    base_before = layer.base_weight().clone()
    train_steps(model)
    assert torch.equal(layer.base_weight(), base_before)  # the frozen base never moves
    trained = logits(model)
    save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / INIT_FILE).is_file() == (init in ("svd", "loftq"))

    fresh = load(tiny_dir, dtype, bits)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh), trained)  # the base is rebuilt bit for bit

    report = export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", dtype="fp32", progress=False)
    assert report["lora"]["init"] == init
    assert report["quant"]["compute_dtype"] == str(dtype).removeprefix("torch.")
    # the reference runs the trained weights in fp32, so only fp32 rounding separates it from the export
    assert report["verify"]["logit_rel_error"]["dequantized"] < 1e-4


def test_default_and_orthogonal_start_as_no_ops(tiny_dir):
    plain = logits(load(tiny_dir))
    for init in ("default", "orthogonal"):
        model = add_lora(load(tiny_dir), LoraConfig(r=8, dropout=0.0, init=init))
        assert torch.equal(logits(model), plain)
    a = next(iter(lora_layers(model).values())).lora_A.weight
    assert torch.allclose(a @ a.T, torch.eye(8), atol=1e-5)


def test_inits_are_deterministic_given_a_seed(tiny_dir):
    def factors(init, seed):
        model = add_lora(load(tiny_dir), LoraConfig(r=4, init=init, seed=seed))
        layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
        return layer.lora_A.weight.clone(), layer.lora_B.weight.clone(), layer.base_weight()

    for init in ("orthogonal", "svd", "loftq"):
        first, again = factors(init, 1), factors(init, 1)
        assert all(torch.equal(x, y) for x, y in zip(first, again)), init
    assert not torch.equal(factors("orthogonal", 1)[0], factors("orthogonal", 2)[0])


def test_svd_factors_are_the_top_singular_triplets_and_the_base_is_the_residual(tiny_dir, dtype):
    model = add_lora(load(tiny_dir, dtype, bits=None), LoraConfig(r=4, alpha=8, dropout=0.0, init="svd"))
    layer = lora_layers(model)["model.layers.0.mlp.down_proj"]
    w = load_file(str(tiny_dir / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"].float()
    s = torch.linalg.svdvals(w)
    got = torch.linalg.svdvals(layer.delta_weight().detach())[:4]
    # a random matrix has a flat spectrum, the hardest case for the randomised SVD: within 1%
    assert torch.allclose(got, s[:4], rtol=1e-2)
    # the residual is stored in the compute dtype: rounding it costs at most half an ulp of its largest entry
    residual = w - layer.delta_weight().detach()
    atol = 1e-6 + torch.finfo(dtype).eps / 2 * float(residual.abs().max())
    assert torch.allclose(layer.base_weight() + layer.delta_weight().detach(), w, atol=atol)
    # unquantised: the model is unchanged at step 0, up to that rounding (fp32: 1e-5; bf16: a few ulps)
    tol = 1e-5 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps
    assert rel(logits(model), logits(load(tiny_dir, dtype, bits=None))) < tol


def test_randomised_svd_matches_exact_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, generator=g))
    v, _ = torch.linalg.qr(torch.randn(500, 300, generator=g))
    s = 0.8 ** torch.arange(300.0)
    m = (u * s) @ v.T
    _, got, _ = top_singular(m, 8, torch.Generator().manual_seed(1))
    assert torch.allclose(got, s[:8], rtol=1e-4)


def test_loftq_starts_closer_to_the_full_precision_model_than_default(tiny_dir):
    full = logits(load(tiny_dir, bits=None))
    errors = {}
    for init in ("default", "loftq"):
        model = add_lora(load(tiny_dir), LoraConfig(r=8, dropout=0.0, init=init))
        errors[init] = rel(logits(model), full)
    assert errors["loftq"] < 0.9 * errors["default"], errors
    # per layer: quant(W) + scale*B@A is nearer W than quant(W)
    layer = lora_layers(model)["model.layers.1.mlp.up_proj"]
    w = load_file(str(tiny_dir / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"].float()
    assert torch.dist(layer.base_weight() + layer.delta_weight(), w) < torch.dist(roundtrip(w, QuantConfig(compute_dtype=FP32)), w)


def test_loftq_rounds_are_recorded_and_rebuilt(tiny_dir, tmp_path, dtype):
    model = add_lora(load(tiny_dir, dtype), LoraConfig(r=4, dropout=0.0, init="loftq", init_iters=3))
    train_steps(model, 1)
    save_adapter(model, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["qlora_kit"]["init"]["name"] == "loftq" and raw["qlora_kit"]["init"]["iters"] == 3
    flat = load_file(str(tmp_path / "a" / INIT_FILE))
    assert any(k.startswith("initial.") for k in flat) and any(k.startswith("offset.") for k in flat)
    fresh = load(tiny_dir, dtype)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh), logits(model))


def test_svd_original_merge_is_w_plus_what_training_changed(tiny_dir, tmp_path):
    model = add_lora(load(tiny_dir), LoraConfig(r=4, dropout=0.0, init="svd"))
    layer = lora_layers(model)["model.layers.0.self_attn.o_proj"]
    a0, b0 = layer.lora_A.weight.clone(), layer.lora_B.weight.clone()
    train_steps(model, 2)
    save_adapter(model, tmp_path / "a")
    export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", dtype="fp32", merge_into="original",
                  progress=False, verify=False)
    w = load_file(str(tiny_dir / "model.safetensors"))["model.layers.0.self_attn.o_proj.weight"].float()
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["model.layers.0.self_attn.o_proj.weight"]
    want = w - lora_delta(a0, b0, layer.scale) + layer.delta_weight()
    assert torch.allclose(got, want, atol=1e-6)


def test_svd_on_an_unquantised_base_exports_exactly(tiny_dir, tmp_path):
    model = add_lora(load(tiny_dir, bits=None), LoraConfig(r=4, dropout=0.0, init="svd"))
    train_steps(model, 2)
    save_adapter(model, tmp_path / "a")
    report = export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", dtype="fp32", progress=False)
    assert report["merge_into"] == "original"
    assert report["verify"]["logit_rel_error"]["original"] < 1e-4


def test_plain_lora_conversion_loads_in_peft_on_the_original_model(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = add_lora(load(tiny_dir, bits=None), LoraConfig(r=4, dropout=0.0, init="svd"))
    train_steps(model, 2)
    save_adapter(model, tmp_path / "a")
    to_plain_lora(tmp_path / "a", tmp_path / "plain")
    raw = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert raw["r"] == 8 and raw["lora_alpha"] == 2 * record_of(model).lora.alpha
    assert not (tmp_path / "plain" / INIT_FILE).exists()
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "plain")).eval()
    assert rel(logits(peft_model), logits(model)) < 1e-4
    with pytest.raises(QLoraKitError, match="plain LoRA already"):
        to_plain_lora(tmp_path / "plain", tmp_path / "again")


# ---------------------------------------------------------------- bad input

def test_unknown_init_lists_the_valid_ones():
    with pytest.raises(QLoraKitError, match="unknown LoRA init 'pissa'.*default, orthogonal, svd, loftq"):
        LoraConfig(init="pissa")
    with pytest.raises(QLoraKitError, match="did you mean 'loftq'"):
        LoraConfig(init="loftQ")
    with pytest.raises(QLoraKitError, match="unknown LoRA init"):
        LoraSection(init="lofty").build(seed=0)
    assert LoraSection(init="svd", init_iters=2).build(seed=0).init_iters == 2


def test_loftq_on_an_unquantised_base_is_refused(tiny_dir):
    with pytest.raises(QLoraKitError, match="not quantised.*QuantConfig"):
        add_lora(load(tiny_dir, bits=None), LoraConfig(init="loftq"))


def test_svd_rank_above_layer_size_is_refused(tiny_dir):
    # k_proj of the tiny model is 32 x 64: r=40 cannot be a rank-40 factorisation of it
    with pytest.raises(QLoraKitError, match=r"r=40 needs r <= min\(out_features, in_features\).*k_proj"):
        add_lora(load(tiny_dir), LoraConfig(r=40, init="svd"))


def test_changed_base_needs_its_folder_and_quantisation(tiny_dir, tmp_path):
    model = add_lora(load(tiny_dir), LoraConfig(r=4, init="svd"))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(QLoraKitError, match="quantised as"):
        load_adapter(load(tiny_dir, bits=8), tmp_path / "a")
    orphan = load(tiny_dir)
    record_of(orphan).source = None
    with pytest.raises(QLoraKitError, match="load_model"):
        add_lora(orphan, LoraConfig(r=4, init="loftq"))
    (tmp_path / "a" / INIT_FILE).unlink()
    with pytest.raises(QLoraKitError, match="missing: copy the whole adapter folder"):
        load_adapter(load(tiny_dir), tmp_path / "a")


def test_adapters_added_to_an_eval_model_run_without_dropout(tiny_dir):
    model = add_lora(load(tiny_dir), LoraConfig(r=4, dropout=0.5, init="svd"))
    assert not any(m.training for m in lora_layers(model).values())
    assert torch.equal(logits(model), logits(model))
