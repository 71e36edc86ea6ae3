"""The fast training path computes the same LoRA math as a plain fp32 implementation.

qlora_kit's step takes shortcuts for speed: a chunked, checkpointed loss, scale folded into B, the
add fused into a GEMM, shared dropout masks drawn from 16-bit integers. These tests rebuild the
same model the slow, obvious way (transformers in fp32, bitsandbytes' own dequantised weights,
y = x W^T + scale * (x A^T) B^T written out, full logits) and compare loss and adapter gradients.
"""

import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from qlora_kit import LoraConfig, QuantConfig, add_lora, load_model, lora_layers, set_gradient_checkpointing
from qlora_kit.lora import dropout_zeros
from qlora_kit.trainer import LossModule

SHAPE = dict(hidden=64, intermediate=176, heads=4, kv_heads=2, layers=2)


class PlainLora(nn.Module):
    """y = x W^T + scale * (x A^T) B^T in fp32, W given (a dequantised weight)."""

    def __init__(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.weight = weight
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(b.clone())
        self.scale = scale

    def forward(self, x):
        return x @ self.weight.T + self.scale * ((x @ self.a.T) @ self.b.T)


def plain_model(folder, compute_dtype: torch.dtype, ours) -> tuple[nn.Module, dict]:
    """fp32 transformers model whose targeted weights are bitsandbytes' NF4 round trip, with the
    adapters of `ours` copied into PlainLora layers."""
    raw = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw.update(load_file(str(f)))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    plain = {}
    for name, layer in lora_layers(ours).items():
        w = raw[f"{name}.weight"].to(compute_dtype)  # the loader quantises in the compute dtype
        data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        dequant = bnbf.dequantize_4bit(data, state).float()
        parent, _, leaf = name.rpartition(".")
        new = PlainLora(dequant, layer.lora_A.weight.detach().float(), layer.lora_B.weight.detach().float(), layer.scale)
        setattr(model.get_submodule(parent), leaf, new)
        plain[name] = new
    return model, plain


def ours_model(folder, compute_dtype: torch.dtype, dropout: float = 0.0, **lora):
    model, _ = load_model(folder, QuantConfig(compute_dtype=compute_dtype), load_tokenizer=False, progress=False)
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=dropout, **lora))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():  # non-zero B, so that A gets a gradient as well
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    return model.train()


def ids(seed=0, n=3, t=40):
    return torch.randint(4, 320, (n, t), generator=torch.Generator().manual_seed(seed))


def ours_loss_and_grads(model, x, chunk_tokens=32):
    set_gradient_checkpointing(model, True)
    loss, _ = LossModule(model, chunk_tokens)(input_ids=x, labels=x)
    loss.backward()
    grads = {n: (m.lora_A.weight.grad, m.lora_B.weight.grad) for n, m in lora_layers(model).items()}
    return loss.item(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float()))


@pytest.mark.parametrize("compute_dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_loss_and_adapter_gradients_match_plain_fp32_lora(tiny_dirs, compute_dtype, tol):
    folder = tiny_dirs("llama", **SHAPE)
    x = ids()
    ours = ours_model(folder, compute_dtype)
    plain, layers = plain_model(folder, compute_dtype, ours)
    loss, grads = ours_loss_and_grads(ours, x)

    ref = plain(input_ids=x, labels=x).loss  # full fp32 logits, no checkpointing
    ref.backward()
    assert abs(loss - ref.item()) / ref.item() < tol / 3
    worst = max(max(rel(grads[n][0], m.a.grad), rel(grads[n][1], m.b.grad)) for n, m in layers.items())
    assert worst < tol, f"adapter gradients differ from the plain fp32 implementation by {worst:.2e}"


def test_dropout_masks_are_replayed_under_checkpointing(tiny_dirs):
    """Recomputing a checkpointed block draws the same masks: gradients equal a run without it."""
    folder = tiny_dirs("llama", **SHAPE)
    x = ids(1)
    results = []
    for checkpointing in (False, True):
        model = ours_model(folder, torch.float32, dropout=0.3)
        set_gradient_checkpointing(model, checkpointing)
        torch.manual_seed(11)
        loss, _ = LossModule(model, 1024)(input_ids=x, labels=x)
        loss.backward()
        results.append((loss.item(), [m.lora_A.weight.grad.clone() for m in lora_layers(model).values()]))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0, g1))


def test_dropout_zeros_rate_and_expectation():
    x = torch.ones(1000, 1000)
    dropped, keep_scale = dropout_zeros(x, 0.05)
    assert float((dropped == 0).float().mean()) == pytest.approx(0.05, abs=2e-3)
    assert float(dropped.mean()) * keep_scale == pytest.approx(1.0, abs=3e-3)
    assert torch.equal(dropout_zeros(x, 0.0)[0], x)


@pytest.mark.parametrize("shared", [True, False])
def test_sibling_projections_share_one_mask_only_when_asked(tiny_dirs, shared):
    folder = tiny_dirs("llama", **SHAPE)
    model = ours_model(folder, torch.float32, dropout=0.5, shared_dropout=shared)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, SHAPE["hidden"])
    masks = [layer._dropped_input(x)[0] == 0 for layer in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert torch.equal(masks[0], masks[1]) == shared and torch.equal(masks[0], masks[2]) == shared
    other = torch.randn(2, 5, SHAPE["hidden"])
    assert not torch.equal(attn.q_proj._dropped_input(other)[0] == 0, masks[0])  # a new input, a new mask
    model.eval()
    assert torch.equal(attn.q_proj._dropped_input(x)[0], x)  # no dropout in eval mode


def test_fused_forward_matches_unfused_formula(tiny_dirs):
    folder = tiny_dirs("llama", **SHAPE)
    model = ours_model(folder, torch.float32).eval()
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 7, SHAPE["intermediate"])
    with torch.no_grad():
        expected = layer.base_layer(x) + layer.scale * F.linear(F.linear(x, layer.lora_A.weight), layer.lora_B.weight)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_shared_dropout_is_a_config_key_and_checked():
    from qlora_kit import QLoraKitError
    from qlora_kit.config import config_from_dict

    config = config_from_dict({"model": {"path": "m"}, "data": {"train": "t.jsonl"},
                               "lora": {"shared_dropout": False}})
    assert config.lora.build(seed=0).shared_dropout is False
    with pytest.raises(QLoraKitError, match="shared_dropout"):
        LoraConfig(shared_dropout="yes")
