"""QuantLinear against its dequantised twin, and the bitsandbytes CPU repack trap."""

import pytest
import torch
import torch.nn.functional as F

from qlora_kit import QLoraKitError, QuantConfig, QuantLinear
from qlora_kit.quant import QuantizedWeight, roundtrip

from conftest import DTYPES

BF16 = torch.bfloat16
CONFIGS = [
    dict(bits=4, quant_type="nf4", double_quant=True),
    dict(bits=4, quant_type="nf4", double_quant=False, blocksize=128),
    dict(bits=4, quant_type="fp4", double_quant=True, blocksize=32),
    dict(bits=8),
]


def bound(dtype, x, w):
    """What rounding to `dtype` may cost in y = x @ W.T: W to the dtype (eps/2 of each weight) and the
    output to the dtype (eps/2 of |y|), each at most eps/2 * |x| @ |W|.T; products summed in fp32."""
    return torch.finfo(dtype).eps * (x.abs().float() @ w.abs().float().T) + 1e-6


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['bits']}bit-{c.get('quant_type')}-dq{c.get('double_quant')}")
def test_output_and_input_gradient_equal_linear_with_dequantised_weight(cfg, any_dtype):
    torch.manual_seed(0)
    w = torch.randn(688, 96)  # 688 % 32 != 0
    layer = QuantLinear.from_weight(w.to(any_dtype), QuantConfig(**cfg, compute_dtype=any_dtype))
    exact = layer.dequantize(torch.float32)
    x = torch.randn(3, 5, 96).to(any_dtype).requires_grad_()
    out = layer(x)
    assert out.dtype == any_dtype
    assert ((out.float() - F.linear(x.detach().float(), exact)).abs() <= bound(any_dtype, x.detach(), exact)).all()
    g = torch.randn(3, 5, 688).to(any_dtype)
    out.backward(g)
    assert x.grad.dtype == any_dtype
    assert ((x.grad.float() - g.float() @ exact).abs() <= bound(any_dtype, g, exact.T)).all()


def test_quantisation_error_matches_published_figures():
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    err = lambda cfg: ((roundtrip(w, cfg) - w).norm() / w.norm()).item()  # noqa: E731
    assert 0.08 < err(QuantConfig(quant_type="nf4", compute_dtype="fp32")) < 0.10   # FACTS: 0.092
    assert 0.11 < err(QuantConfig(quant_type="fp4", compute_dtype="fp32")) < 0.13   # FACTS: 0.122
    assert err(QuantConfig(bits=8, compute_dtype="fp32")) < 0.01


def test_weight_is_frozen_and_packed():
    layer = QuantLinear.from_weight(torch.randn(88, 64, dtype=BF16), QuantConfig(compute_dtype=BF16))
    x = torch.randn(4, 64, dtype=BF16, requires_grad=True)
    layer(x).sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    assert layer.weight.dtype == torch.uint8  # the packed weight, a frozen parameter FSDP can shard


@pytest.mark.parametrize("bits", [4, 8])
def test_eval_train_eval_keeps_weight_and_gradients(bits, any_dtype):
    """The trap: bnb's Linear4bit repacks its weight on the first no-grad eval forward on AVX512-BF16
    CPUs, after which dequantisation is garbage and training loses its input gradient. Our layer
    must give identical numbers before and after any number of eval passes."""
    torch.manual_seed(0)
    layer = QuantLinear.from_weight(torch.randn(688, 64, dtype=any_dtype), QuantConfig(bits=bits, compute_dtype=any_dtype))
    before = layer.dequantize().clone()
    x = torch.randn(2, 64, dtype=any_dtype)
    layer.eval()
    with torch.no_grad():
        y0 = layer(x)
    layer.train()
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    layer.eval()
    with torch.inference_mode():
        y1 = layer(x)
    assert torch.equal(y0, y1)
    assert torch.equal(before, layer.dequantize())


def test_bitsandbytes_linear4bit_trap_is_real_or_absent():
    """Documents the upstream behaviour our design works around: after an eval forward, bnb's own
    Linear4bit may no longer dequantise to its weight. If bitsandbytes fixes this, the test still
    passes; it fails only if our understanding of the API breaks (e.g. the module disappears)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(96, 64, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4")
    lin = lin.to("cpu")
    lin.weight._quantize("cpu") if not lin.weight.bnb_quantized else None
    before = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    lin.eval()
    with torch.no_grad():
        lin(torch.randn(2, 64, dtype=torch.bfloat16))
    after = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    drift = ((after - before).norm() / before.norm()).item()
    # Either untouched (no AVX512-BF16, or fixed upstream) or badly corrupted (the trap).
    assert drift == 0.0 or drift > 0.5


@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=3), "bits=3"),
    (dict(bits=16), "bits=16"),
    (dict(quant_type="int4"), "quant_type"),
    (dict(blocksize=100), "blocksize"),
    (dict(compute_dtype="float64"), "compute_dtype"),
])
def test_bad_quant_config(kwargs, needle):
    with pytest.raises(QLoraKitError, match=needle):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_auto_dtype_on_cuda_is_bf16_only_where_the_card_has_it(monkeypatch, capability, expected):
    from qlora_kit.dtypes import fast_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # true on a T4: emulation
    assert fast_dtype("cuda") is expected


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(100, 320), (101, 65), (97, 64)])
def test_sliced_quantiser_is_bit_identical_to_one_call(monkeypatch, shape, double_quant):
    """Large weights are quantised in slices (bounded scratch memory); the result must not change."""
    import qlora_kit.quant as quant

    monkeypatch.setattr(quant, "QUANT_CHUNK", 4096)
    w = torch.randn(*shape, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    for quant_type in ("nf4", "fp4"):
        assert_quantised_as_bitsandbytes_does(w, quant_type, double_quant)


def assert_quantised_as_bitsandbytes_does(w: torch.Tensor, quant_type: str, double_quant: bool) -> None:
    """Our (possibly sliced) 4-bit quantiser gives bitsandbytes' own bytes, constants and dequantisation
    for the bf16 weight `w`, on whatever device `w` lives on."""
    import bitsandbytes.functional as bnbf

    ours = QuantizedWeight(w, QuantConfig(quant_type=quant_type, double_quant=double_quant, compute_dtype=BF16))
    data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    assert ours.data.device == w.device
    assert torch.equal(ours.data, data)
    assert torch.equal(ours.state.absmax, state.absmax)
    if double_quant:
        assert torch.equal(ours.state.state2.absmax, state.state2.absmax)
        assert torch.equal(ours.state.offset, state.offset)
    assert torch.equal(ours.dequantize(torch.float32), bnbf.dequantize_4bit(data, state).float())


@pytest.mark.parametrize("has_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_the_probe(fake_cpu, has_bf16, expected):
    from qlora_kit.dtypes import fast_dtype

    fake_cpu(has_bf16)
    assert fast_dtype("cpu") is expected
    assert QuantConfig().resolved("cpu").compute_dtype is expected
    assert QuantLinear.from_weight(torch.randn(64, 32), QuantConfig()).compute_dtype is expected


@pytest.mark.parametrize("flag, expected", [("1", True), ("0", False)])
def test_cpu_probe_can_be_forced_by_environment(monkeypatch, flag, expected):
    from conftest import REAL_PROBE

    monkeypatch.setenv("QLORA_KIT_CPU_BF16", flag)
    assert REAL_PROBE() is expected


def test_int8_quantises_from_fp16_whatever_the_compute_dtype():
    """bitsandbytes' CUDA int8 quantiser takes fp16 only; the CPU one is made to agree with it."""
    import bitsandbytes.functional as bnbf

    w = torch.randn(96, 64)
    for dtype in DTYPES.values():
        want, scale, _ = bnbf.int8_vectorwise_quant(w.to(dtype).half())
        q = QuantizedWeight(w.to(dtype), QuantConfig(bits=8, compute_dtype=dtype))
        assert torch.equal(q.data, want) and torch.equal(q.row_scale, scale)
