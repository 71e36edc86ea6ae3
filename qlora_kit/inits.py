"""How an adapter starts: four initialisations of A and B, and the frozen base each one implies.

    default     A Kaiming-uniform, B = 0                      base = quant(W)          adapter starts as a no-op
    orthogonal  A with orthonormal rows, B = 0                base = quant(W)          adapter starts as a no-op
    svd         scale*B@A = top-r SVD of W (PiSSA)            base = quant(W - scale*B@A)
    loftq       T times: Q = quant(W - scale*B@A);            base = Q                 Q + scale*B@A ~ W
                B, A = top-r SVD of (W - dequant(Q))  (LoftQ)

svd and loftq change the base, so they need W at full precision. `load_model` never keeps it (it
quantises each weight as it streams), so these inits re-read each targeted weight from the model's
safetensors folder, memory-mapped and one tensor at a time: memory grows by one weight, not by the
model, and `load_model` stays a plain loader. Every changed base has the same form

    base = quant(W - scale * B_off @ A_off)

so the adapter folder stores (A_off, B_off) per module (and the initial A, B when they differ, as
for loftq) in `qlora_kit_init.safetensors`. Rebuilding the base is then one subtraction and one
quantisation with the same arithmetic, bit for bit, in `load_adapter` and in the exporter.

The SVDs are randomised (a seeded Gaussian range finder with power iterations): an exact SVD of a
4096 x 11008 matrix takes tens of seconds on a small CPU, the range finder about a second. The
base is computed from whatever A_off, B_off came out, so the approximation never breaks exactness.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import QLoraKitError, first_few
from .lora import CHANGES_BASE, ChangedBase, LoraConfig, LoraLinear, lora_delta
from .quant import QuantConfig, QuantizedWeight, QuantLinear
from .tensorfiles import SourceWeights

OVERSAMPLE = 8
POWER_ITERS = 4


# ---------------------------------------------------------------- the maths

def top_singular(m: torch.Tensor, r: int, generator: torch.Generator | None = None):
    """(U_r, S_r, Vh_r) of an fp32 matrix by a randomised range finder (Halko et al. 2011).

    q = r + 8 random probes, 4 power iterations with re-orthonormalisation; deterministic given the
    generator. Falls back to the exact SVD when the matrix is barely larger than the probes."""
    d, k = m.shape
    q = r + OVERSAMPLE
    if q >= min(d, k):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    probes = torch.randn(k, q, generator=generator, dtype=m.dtype).to(m.device)
    basis = torch.linalg.qr(m @ probes).Q
    for _ in range(POWER_ITERS):
        basis = torch.linalg.qr(m @ torch.linalg.qr(m.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ u)[:, :r], s[:r], vh[:r]


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scale: float):
    """A, B with scale * B @ A = U diag(S) Vh, the singular values shared evenly (PEFT's PiSSA convention)."""
    root = torch.sqrt(s / scale)
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


def residual(weight: torch.Tensor, a_off: torch.Tensor, b_off: torch.Tensor, scale: float,
             dtype: torch.dtype) -> torch.Tensor:
    """W - scale * B_off @ A_off in fp32, cast to the dtype the loader quantises from.

    The one formula for a changed base: the init, load_adapter and the exporter all call it."""
    return (weight.float() - lora_delta(a_off, b_off, scale).to(weight.device)).to(dtype)


def orthogonal_a(r: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """r x in_features with orthonormal rows (QR of a seeded Gaussian matrix, signs fixed)."""
    q, rr = torch.linalg.qr(torch.randn(in_features, r, generator=generator))
    return (q * torch.sign(torch.diagonal(rr))[None, :]).T.contiguous()


def svd_init(weight: torch.Tensor, r: int, scale: float, generator: torch.Generator | None = None):
    """PiSSA: A, B from the top-r singular triplets of W; they are also the base offset."""
    return split_factors(*top_singular(weight.float(), r, generator), scale)


def loftq_init(weight: torch.Tensor, r: int, scale: float, quant: QuantConfig, iters: int,
               generator: torch.Generator | None = None):
    """LoftQ: (A, B, A_off, B_off, qweight) after `iters` rounds of quantise-then-SVD.

    The base is qweight = quant(W - scale * B_off @ A_off), where (A_off, B_off) are the factors
    from the round before the last (zero after one round, so the base is plain quant(W))."""
    w = weight.float()
    d, k = w.shape
    a, b = torch.zeros(r, k, device=w.device), torch.zeros(d, r, device=w.device)
    for _ in range(iters):
        a_off, b_off = a, b
        qweight = QuantizedWeight(residual(w, a_off, b_off, scale, quant.compute_dtype), quant)
        a, b = split_factors(*top_singular(w - qweight.dequantize(torch.float32), r, generator), scale)
    return a, b, a_off, b_off, qweight


# ---------------------------------------------------------------- reading W back

def source_weights(folder: Path | None, init: str) -> SourceWeights:
    if folder is None:
        raise QLoraKitError(f"init={init!r} needs the base's full-precision weights, and this model does not know "
                            "its folder: load it with qlora_kit.load_model(path), which records where to re-read them")
    return SourceWeights(folder)


# ---------------------------------------------------------------- applying to a model

def check_init_fits(model: nn.Module, names: list[str], config: LoraConfig) -> None:
    """Clear errors before any work: loftq needs a quantised base, svd/loftq/orthogonal need r small enough."""
    if config.init == "loftq" and not all(isinstance(model.get_submodule(n), QuantLinear) for n in names):
        raise QLoraKitError("init='loftq' fits the adapter to the quantisation error, and this base is not "
                            "quantised: load it with a QuantConfig (4- or 8-bit), or use init='svd' or 'default'")
    too_big = []
    for name in names:
        m = model.get_submodule(name)
        limit = m.in_features if config.init == "orthogonal" else min(m.in_features, m.out_features)
        if config.init != "default" and config.r > limit:
            too_big.append(f"{name} ({m.out_features} x {m.in_features})")
    if too_big:
        what = "the layer's input size" if config.init == "orthogonal" else "min(out_features, in_features)"
        raise QLoraKitError(f"init={config.init!r} with r={config.r} needs r <= {what}, which fails for "
                            f"{first_few(too_big, 3)}: lower r or leave those layers out of targets")


def initialise(layers: dict[str, LoraLinear], config: LoraConfig, folder: Path | None) -> None:
    """Set A, B (and for svd/loftq the base) of freshly added LoraLinear layers as config.init says;
    svd/loftq re-read each targeted W from `folder`, the model's own."""
    if config.init == "default":
        return
    generator = torch.Generator().manual_seed(config.seed if config.seed is not None else 0)
    source = source_weights(folder, config.init) if config.init in CHANGES_BASE else None
    for name, layer in layers.items():
        if config.init == "orthogonal":
            set_factors(layer, orthogonal_a(layer.r, layer.in_features, generator), None)
            continue
        weight = source.get(name + ".weight").to(layer.lora_A.weight.device)
        if config.init == "svd":
            a, b = svd_init(weight, layer.r, layer.scale, generator)
            set_factors(layer, a, b)
            rebuild_base(layer, weight, a, b)
            layer.changed_base = ChangedBase((a.cpu(), b.cpu()))
        else:
            quant = layer.base_layer.qweight.config
            a, b, a_off, b_off, qweight = loftq_init(weight, layer.r, layer.scale, quant, config.init_iters, generator)
            set_factors(layer, a, b)
            _replace_base(layer, qweight)
            layer.changed_base = ChangedBase((a_off.cpu(), b_off.cpu()), (a.cpu(), b.cpu()))
        del weight


def set_factors(layer: LoraLinear, a: torch.Tensor, b: torch.Tensor | None) -> None:
    with torch.no_grad():
        layer.lora_A.weight.copy_(a)
        if b is None:
            layer.lora_B.weight.zero_()
        else:
            layer.lora_B.weight.copy_(b)


def rebuild_base(layer: LoraLinear, weight: torch.Tensor, a_off: torch.Tensor, b_off: torch.Tensor) -> None:
    """Make the layer's frozen base quant(W - scale * B_off @ A_off) (or unquantised, if the base is)."""
    base = layer.base_layer
    if isinstance(base, QuantLinear):
        # quantised from the dtype the loader quantised W from (the config's compute dtype), whatever
        # dtype this layer now computes in: the export's fp32 reference rebuilds the same base
        config = base.qweight.config
        _replace_base(layer, QuantizedWeight(residual(weight, a_off, b_off, layer.scale, config.compute_dtype), config))
    else:
        with torch.no_grad():
            base.weight.copy_(residual(weight, a_off, b_off, layer.scale, base.weight.dtype))


def _replace_base(layer: LoraLinear, qweight: QuantizedWeight) -> None:
    """A new quantised base that computes (and keeps its bias) in the old one's dtype."""
    old = layer.base_layer
    layer.base_layer = QuantLinear(qweight, None if old.bias is None else old.bias.detach(), old.compute_dtype)
