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

Mixture-of-experts checkpoints store one tensor per expert and projection, which the loader fuses
by transformers' conversion (see qlora_kit.moe) and quantises one fused expert matrix at a time
(gate and up together). `ExpertMerge` repeats that per expert: fuse the expert's checkpoint
tensors, round-trip them through the quantiser as the loader did, add the expert's delta, and
split the result back with the conversion's reversed operations, so the export keeps the
checkpoint's own names and shapes.
"""

from __future__ import annotations

import torch

from ..inits import residual
from ..lora import ChangedBase, LoraConfig, expert_factors, lora_delta
from ..moe import ExpertLayout, ExpertPiece
from ..quant import QuantConfig, roundtrip
from ..tensorfiles import SourceWeights

MERGE_BASES = ("dequantized", "original")  # the first is the default


class ExpertMerge:
    """What merging a mixture-of-experts checkpoint adds: where each checkpoint key goes (transformers'
    conversion), the expert adapters ({fused parameter key: (A, B)} in PEFT's layout), and access
    to an expert's other checkpoint tensors (gate and up are merged together)."""

    def __init__(self, layout: ExpertLayout, keys: list[str], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 source: SourceWeights):
        self.layout, self.pairs, self.source = layout, pairs, source
        self.groups: dict[tuple[str, int], dict[str, str]] = {}  # (fused param, expert) -> {pattern: checkpoint key}
        self.fused: set[str] = set()  # fused parameters stored as such (transformers' in-memory layout)
        params = {f"{m}.{p}" for m, module in layout.experts.items() for p in module._parameters}
        for key in keys:
            name, piece = layout.locate(key)
            if piece is not None:
                self.groups.setdefault((piece.param, piece.expert), {})[piece.pattern] = key
            elif name in params:
                self.fused.add(name)

    def experts(self, param: str) -> int:
        owner, _, name = param.rpartition(".")
        return self.layout.experts[owner]._parameters[name].shape[0]


class Merger:
    """Turns one base tensor into the tensor to write: merge base, + adapter delta in fp32, cast."""

    def __init__(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], lora: LoraConfig,
                 quant: QuantConfig | None, quantised: set[str], merge_into: str, dtype: torch.dtype,
                 states: dict[str, ChangedBase] | None = None, experts: ExpertMerge | None = None):
        self.pairs, self.scale, self.quant = pairs, lora.scale, quant
        self.quantised, self.merge_into, self.dtype = quantised, merge_into, dtype
        self.states = states or {}  # {weight key: ChangedBase} for bases an svd/loftq init changed
        self.experts = experts
        self.ready: dict[str, torch.Tensor] = {}  # an expert's other merged tensors, until the stream reaches them

    def locate(self, key: str) -> tuple[str, ExpertPiece | None]:
        return self.experts.layout.locate(key) if self.experts is not None else (key, None)

    def fused_expert(self, piece: ExpertPiece, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """One expert's merged fused matrix (fp32): the loader's fused base, + the expert's delta."""
        group = self.experts.groups[(piece.param, piece.expert)]
        parts = {p: tensor if k == key else self.experts.source.get(k) for p, k in group.items()}
        dequantized = self.merge_into == "dequantized" and self.quant is not None
        if dequantized:  # the loader casts each piece to the compute dtype, fuses, then quantises
            parts = {p: t.to(self.quant.compute_dtype) for p, t in parts.items()}
        w = self.experts.layout.fuse(piece.converter, parts)
        w = roundtrip(w, self.quant) if dequantized else w.float()
        ab = self.experts.pairs.get(piece.param)
        if ab is not None:
            a, b = expert_factors(*ab, piece.expert, self.experts.experts(piece.param))
            w = w + lora_delta(a, b, self.scale)
        return w

    def merged_fused(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A fused [experts, out, in] checkpoint tensor (transformers' own layout), merged expert by expert."""
        dequantized = self.merge_into == "dequantized" and self.quant is not None
        ab = self.experts.pairs.get(name)
        out = torch.empty(tensor.shape, dtype=self.dtype)
        for e in range(tensor.shape[0]):
            w = roundtrip(tensor[e].to(self.quant.compute_dtype), self.quant) if dequantized else tensor[e].float()
            if ab is not None:
                w = w + lora_delta(*expert_factors(*ab, e, tensor.shape[0]), self.scale)
            out[e] = w.to(self.dtype)
        return out

    def merged_expert(self, piece: ExpertPiece, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key in self.ready:
            return self.ready.pop(key)
        fused = self.fused_expert(piece, key, tensor)
        group = self.experts.groups[(piece.param, piece.expert)]
        split = self.experts.layout.split(piece.converter, fused)
        for pattern, k in group.items():
            if k != key:
                self.ready[k] = split[pattern].to(self.dtype)
        return split[piece.pattern].to(self.dtype)

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
        name, piece = self.locate(key)
        if piece is not None:
            return self.merged_expert(piece, key, tensor)
        if self.experts is not None and name in self.experts.fused:
            return self.merged_fused(name, tensor)
        if name in self.pairs:  # adapters and quantised weights go by the model's key (Mixtral renames)
            return self.merged_fp32(name, tensor, norms).to(self.dtype)
        return self.base_weight(name, tensor).to(self.dtype)


def _fro(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t))
