"""Frozen quantised linear layers, built on bitsandbytes' functional quantisers.

A `QuantLinear` stores its weight the way bitsandbytes does (NF4/FP4 blocks with absmax
constants, optionally double-quantised; or LLM.int8's row-wise int8 with one scale per row)
and computes ``x @ dequant(W).T`` in the compute dtype.

Why not `bnb.nn.Linear4bit`: on CPUs with AVX512-BF16 its first eval-mode forward repacks the
weight in place for a fused kernel. After that `dequantize_4bit` returns garbage (merges break),
training gets no input gradient, and layers whose out_features is not a multiple of 32 crash.
Here the packed weight is never handed to that path: every use goes through `dequantize`, so
eval -> train -> eval -> merge gives the same numbers in any order, on CPU and CUDA alike.

The dequantised weight is never kept: a custom autograd function dequantises again in the
backward pass, so activation memory holds inputs only, as a normal frozen layer would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .dtypes import as_dtype, dtype_name, resolve_dtype
from .errors import QLoraKitError

@dataclass(frozen=True)
class QuantConfig:
    """How the frozen base's linear weights are stored.

    bits: 4 (NF4/FP4 blocks) or 8 (LLM.int8 row-wise int8).
    quant_type: "nf4" or "fp4" (4-bit only).
    double_quant: quantise the absmax constants too (0.5 -> ~0.127 bits per parameter).
    blocksize: weights per absmax constant (4-bit), a power of two from 32 (CPU) or 64 (CUDA) to 4096.
    compute_dtype: dtype of activations, unquantised weights and the dequantised weight in matmuls;
        "auto" (default) picks bf16 where the hardware is fast at it, else fp16/fp32 (see fast_dtype).
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype | str = "auto"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QLoraKitError(
                f"bits={self.bits!r} is not supported: use 4 (NF4/FP4) or 8 (LLM.int8), "
                "or quant=None to load the base unquantised")
        if self.quant_type not in ("nf4", "fp4"):
            raise QLoraKitError(f"unknown quant_type {self.quant_type!r}: use 'nf4' or 'fp4'")
        b = self.blocksize
        if not isinstance(b, int) or b < 32 or b > 4096 or b & (b - 1):
            raise QLoraKitError(f"blocksize={b!r}: use a power of two between 32 and 4096 (64 is usual)")
        if self.compute_dtype != "auto":
            object.__setattr__(self, "compute_dtype", as_dtype(self.compute_dtype, "compute_dtype"))

    def resolved(self, device: str | torch.device = "cpu") -> "QuantConfig":
        """This config with an 'auto' compute dtype replaced by the device's fast dtype."""
        return replace(self, compute_dtype=resolve_dtype(self.compute_dtype, device))

    def same_storage(self, other: "QuantConfig | None") -> bool:
        """Same bits, type, blocksize and double quant; the compute dtype may differ by device."""
        return other is not None and ((self.bits, self.quant_type, self.blocksize, self.double_quant)
                                      == (other.bits, other.quant_type, other.blocksize, other.double_quant))

    def to_dict(self) -> dict:
        return {"bits": self.bits, "quant_type": self.quant_type, "double_quant": self.double_quant,
                "blocksize": self.blocksize, "compute_dtype": dtype_name(self.compute_dtype)}


def _bnb():
    # On CPUs with AVX512-BF16 bitsandbytes tries to fetch a fused kernel from a hub at import and
    # logs the failure; we never use that kernel (see the module docstring), so keep it quiet.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf
    return bnbf


QUANT_CHUNK = 1 << 24  # weights per call of the 4-bit quantiser, which needs ~14 bytes of scratch per weight


def _quantize_4bit(weight: torch.Tensor, config: QuantConfig):
    """bitsandbytes' quantize_4bit, run over slices of at most QUANT_CHUNK weights.

    Blocks never straddle slices, and the double quantisation of the block constants runs once
    over all of them, as bitsandbytes does, so the result is bit-identical to one call on the whole
    tensor; the quantiser's scratch memory is bounded by the slice (a 4096 x 11008 matrix would
    need 0.6 GiB of it at once)."""
    bnbf = _bnb()
    n, block = weight.numel(), config.blocksize
    step = max(block, QUANT_CHUNK // block * block)
    if n <= step:
        return bnbf.quantize_4bit(weight, blocksize=block, compress_statistics=config.double_quant,
                                  quant_type=config.quant_type)
    flat = weight.reshape(-1)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=weight.device)
    absmax = torch.empty((n + block - 1) // block, dtype=torch.float32, device=weight.device)
    for start in range(0, n, step):
        part, scale = torch.ops.bitsandbytes.quantize_4bit.default(
            flat[start:start + step], block, config.quant_type, torch.uint8)
        packed[start // 2:start // 2 + part.shape[0]] = part.view(-1, 1)
        absmax[start // block:start // block + scale.numel()] = scale.view(-1)
    code = bnbf.get_4bit_type(config.quant_type, device=weight.device)
    common = dict(shape=weight.shape, dtype=weight.dtype, blocksize=block, code=code, quant_type=config.quant_type)
    if not config.double_quant:
        return packed, bnbf.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, bnbf.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


class QuantizedWeight:
    """A weight matrix in bitsandbytes' storage: packed data plus what it takes to dequantise it."""

    def __init__(self, weight: torch.Tensor, config: QuantConfig):
        self.shape = tuple(weight.shape)
        self.config = config
        bnbf = _bnb()
        if config.bits == 4:
            self.data, self.state = _quantize_4bit(weight.contiguous(), config)
        else:
            # LLM.int8 quantises from fp16 (bitsandbytes' CUDA kernel accepts nothing else, and its
            # Int8Params casts to fp16 first): do the same on every device, so CPU and GPU store the same rows
            self.data, self.row_scale, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32, data: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as the model sees it. `data` replaces the packed tensor this object was built with
        (a sharded model hands in the gathered one)."""
        bnbf = _bnb()
        data = self.data if data is None else data
        if self.config.bits == 4:
            return bnbf.dequantize_4bit(data, self.state).to(dtype)
        return bnbf.int8_vectorwise_dequant(data, self.row_scale).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this weight holds (packed data and constants), for memory accounting."""
        if self.config.bits == 8:
            return [self.data, self.row_scale]
        s = self.state
        out = [self.data, s.absmax, s.code]
        if s.nested:
            out += [s.state2.absmax, s.state2.code, s.offset]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.data.device


class _DequantLinearFn(torch.autograd.Function):
    """y = x @ W.T with W dequantised on the fly, in forward and again in backward (never stored)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantised. Only the input gets gradients.

    The packed weight is a frozen parameter (`weight`, uint8 or int8), so FSDP can shard it and
    gather it around each use; the small quantisation constants stay beside it, replicated."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.qweight = qweight
        self.weight = nn.Parameter(qweight.data, requires_grad=False)
        self.out_features, self.in_features = qweight.shape
        # default: the dtype the weight was quantised from; a caller may compute in another (the export's
        # fp32 reference runs a bf16-quantised base in fp32)
        self.compute_dtype = compute_dtype or resolve_dtype(qweight.config.compute_dtype, qweight.device)
        # a copy, never a view of the caller's tensor (which may be a page of a mapped checkpoint file)
        self.bias = None if bias is None else nn.Parameter(bias.to(self.compute_dtype, copy=True), requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, config: QuantConfig, bias: torch.Tensor | None = None,
                    device: str | torch.device | None = None) -> "QuantLinear":
        """Quantise a full-precision weight on `device` (where it will be used)."""
        weight = weight.to(device) if device is not None else weight
        bias = None if bias is None else bias.to(weight.device)
        return cls(QuantizedWeight(weight, config), bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantLinearFn.apply(x.to(self.compute_dtype), self)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.qweight.nbytes() + extra

    def extra_repr(self) -> str:
        c = self.qweight.config
        kind = f"{c.quant_type}{'+dq' if c.double_quant else ''}" if c.bits == 4 else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias is not None}"


def roundtrip(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """dequant(quant(W)) in fp32: exactly the weight a model loaded with `config` computes with."""
    return QuantizedWeight(weight, config).dequantize(torch.float32)
