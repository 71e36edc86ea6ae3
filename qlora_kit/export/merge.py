"""The merge of one base tensor: the weight the adapter was trained against, plus its delta, in fp32.

    W  = the merge base:  dequant(quant(W))  as the adapter saw it during training  ("dequantized")
                       or W as stored in the base folder                            ("original")
    W += scale * B @ A    (fp32, lora_delta: the same formula as the forward pass)

Adapters whose init changed the base (svd, loftq; see qlora_kit.inits) carry the factors that
rebuild it: "dequantized" then merges into dequant(quant(W - scale * B_off @ A_off)), the base the
adapter trained on, and "original" into W - scale * B0 @ A0 (B0, A0: the adapter's initial value), so
that it adds exactly what training changed to the original weights (for PiSSA without quantisation
that is the trained model itself; PEFT converts PiSSA adapters the same way).

Why "dequantized" is the default: the adapter was trained against dequant(quant(W)), not against W,
so merging into that base reproduces the fine-tuned model; merging into the original weights adds
back the quantisation error the adapter learned around. The report measures both.
"""

from __future__ import annotations

import torch

from ..inits import residual
from ..lora import ChangedBase, LoraConfig, lora_delta
from ..quant import QuantConfig, roundtrip

MERGE_BASES = ("dequantized", "original")  # the first is the default


class Merger:
    """Turns one base tensor into the tensor to write: merge base, + adapter delta in fp32, cast."""

    def __init__(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], lora: LoraConfig,
                 quant: QuantConfig | None, quantised: set[str], merge_into: str, dtype: torch.dtype,
                 states: dict[str, ChangedBase] | None = None):
        self.pairs, self.scale, self.quant = pairs, lora.scale, quant
        self.quantised, self.merge_into, self.dtype = quantised, merge_into, dtype
        self.states = states or {}  # {weight key: ChangedBase} for bases an svd/loftq init changed

    def base_weight(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The merge base for `key`: what the trained model computed with, or the stored weight."""
        state = self.states.get(key)
        if state is not None and (self.merge_into == "original" or self.quant is None):
            return residual(tensor, *state.start, self.scale, torch.float32)
        if self.merge_into == "original" or self.quant is None:
            return tensor
        if state is not None:  # the same arithmetic as the init and load_adapter: bit-identical base
            seen = residual(tensor, *state.offset, self.scale, self.quant.compute_dtype)
            return roundtrip(seen, self.quant) if key in self.quantised else seen
        seen = tensor.to(self.quant.compute_dtype)  # the loader casts before quantising
        return roundtrip(seen, self.quant) if key in self.quantised else seen

    def merged_fp32(self, key: str, tensor: torch.Tensor, norms: dict | None = None) -> torch.Tensor:
        w = self.base_weight(key, tensor).float()
        a, b = self.pairs[key]
        delta = lora_delta(a, b, self.scale)
        if norms is not None:
            module = key.removesuffix(".weight")
            d, n = _fro(delta), _fro(w)
            norms[module] = {"delta": d, "weight": n, "relative": d / max(n, 1e-30)}
        return w.add_(delta)

    def merged(self, key: str, tensor: torch.Tensor, norms: dict | None = None) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        if key in self.pairs:
            return self.merged_fp32(key, tensor, norms).to(self.dtype)
        return self.base_weight(key, tensor).to(self.dtype)


def _fro(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t))
