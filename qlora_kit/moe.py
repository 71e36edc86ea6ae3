"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): experts quantised one by one.

transformers 5 keeps a layer's experts fused in memory, one 3-D parameter per projection:

    mlp.experts.gate_up_proj   [experts, 2 * moe_intermediate, hidden]   (gate rows, then up rows)
    mlp.experts.down_proj      [experts, hidden, moe_intermediate]

while checkpoints store one tensor per expert and projection (Mixtral: `block_sparse_moe.experts.3.w1
.weight`, Qwen: `mlp.experts.3.gate_proj.weight`). transformers converts between the two with its
checkpoint conversion mapping (renamings plus WeightConverters whose operations stack experts and
concatenate gate with up). `ExpertLayout` applies that mapping, the library's own, one expert at a
time: each expert's fused matrix is built from its checkpoint tensors by the converter's operations,
quantised, and dropped, so loading never holds more than one expert in full precision. The export
runs the reversed operations to write merged experts back under the checkpoint's own names.
Checkpoints already in the fused layout (a transformers state dict saved as is) load and export too.

`MoeExperts` replaces transformers' experts module: the same forward (tokens routed by the frozen,
unquantised router, each expert's SwiGLU, outputs weighted and summed), with each expert's two
projections as QuantLinear layers (or plain linears for an unquantised base), so the repack-safe
dequantising path of quant.py serves experts too. With `target_experts`, an ExpertLora per fused
parameter adds PEFT-layout low-rank updates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import QLoraKitError
from .lora import ExpertLora
from .quant import QuantConfig, QuantLinear

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers' fused expert parameters, in registration order


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module whose weights are fused 3-D parameters."""
    params = module._parameters
    return "gate_up_proj" in params and "down_proj" in params and params["gate_up_proj"].dim() == 3


def check_experts_supported(name: str, module: nn.Module) -> None:
    """Only the layout MoeExperts computes: bias-free [experts, out, in] gate_up/down with a SwiGLU."""
    extra = sorted(set(module._parameters) - set(EXPERT_PARAMS))
    if extra or getattr(module, "is_transposed", False) or not hasattr(module, "act_fn"):
        why = f"it also has {extra}" if extra else "its weights are stored transposed or it has no act_fn"
        raise QLoraKitError(f"the experts module {name} ({type(module).__name__}) is not supported: {why}. qlora_kit "
                            "supports Mixtral, Qwen2-MoE and Qwen3-MoE experts; load this model without quantisation "
                            "in plain transformers")


@dataclass(frozen=True)
class ExpertPiece:
    """One checkpoint tensor that is part of a fused expert parameter."""

    param: str    # the fused parameter's model key, 'model.layers.0.mlp.experts.gate_up_proj'
    expert: int
    pattern: str  # the converter's source pattern it matched, '.experts.*.w1.weight'
    converter: object  # transformers' WeightConverter for this parameter


class ExpertLayout:
    """transformers' checkpoint conversion mapping for one model, applied a key (or an expert) at a time."""

    def __init__(self, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.config = model.config
        transforms = get_model_conversion_mapping(model, add_legacy=False)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.experts = {name: m for name, m in model.named_modules() if is_fused_experts(m)}
        for name, module in self.experts.items():
            check_experts_supported(name, module)
        if self.experts and not self.converters:
            raise QLoraKitError(f"{type(model).__name__} fuses its experts but transformers has no checkpoint conversion "
                                "for it: qlora_kit supports Mixtral, Qwen2-MoE and Qwen3-MoE experts")

    def locate(self, key: str) -> tuple[str, ExpertPiece | None]:
        """The model key a checkpoint key loads into, and for an expert's tensor, which piece it is."""
        from transformers.core_model_loading import apply_converters, apply_renamings

        renamed = apply_renamings(key, self.renamings)
        target, pattern = apply_converters(renamed, self.converters)
        if pattern is None:
            return target, None
        if target.rpartition(".")[0] not in self.experts:
            raise QLoraKitError(f"checkpoint tensor {key} is converted by transformers into {target}, which is not "
                                "an experts module qlora_kit knows: only MoE experts conversions are supported")
        converter = next(c for c in self.converters if pattern in c.source_patterns)
        match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
        if match is None:
            raise QLoraKitError(f"checkpoint tensor {key} matched the expert pattern {pattern!r} without an expert "
                                "number: this checkpoint's expert layout is not supported")
        return target, ExpertPiece(target, int(match.group(1)), pattern, converter)

    def fuse(self, converter, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """One expert's fused matrix from its checkpoint tensors ({pattern: tensor}), by the converter's
        own operations (stack the expert list, concatenate gate with up)."""
        patterns = converter.source_patterns
        missing = [p for p in patterns if p not in parts]
        if missing:
            raise QLoraKitError(f"an expert lacks its checkpoint tensors {missing}: the checkpoint is incomplete")
        tensors: dict = {p: [parts[p]] for p in patterns}
        for op in converter.operations:
            tensors = op.convert(tensors, source_patterns=patterns, target_patterns=converter.target_patterns,
                                 config=self.config)
        (fused,) = tensors.values()
        return fused[0]

    def split(self, converter, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inverse of `fuse`, by the converter's reversed operations: {pattern: checkpoint tensor}."""
        reverse = converter.reverse_transform()
        tensors: dict = {reverse.source_patterns[0]: fused.unsqueeze(0)}
        for op in reverse.operations:
            tensors = op.convert(tensors, source_patterns=reverse.source_patterns,
                                 target_patterns=reverse.target_patterns, config=self.config)
        return {p: tensors[p.replace("*", "0")] for p in converter.source_patterns}


def peft_paths(module_name: str, params: list[str]) -> dict[str, str]:
    """{fused parameter's model key: PEFT's adapter module path}. PEFT nests one wrapper per targeted
    parameter, the first registered innermost: gate_up_proj -> '<experts>.base_layer', down_proj -> '<experts>'."""
    return {f"{module_name}.{p}": module_name + ".base_layer" * (len(params) - 1 - i) for i, p in enumerate(params)}


class MoeExperts(nn.Module):
    """A layer's experts as per-expert frozen linear layers (QuantLinear or nn.Linear), computing what
    transformers' experts module computes: forward(hidden_states, top_k_index, top_k_weights)."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self.num_experts = source._parameters["gate_up_proj"].shape[0]
        self.act_fn = source.act_fn
        self.params = list(EXPERT_PARAMS)
        self.shapes = {p: tuple(source._parameters[p].shape) for p in self.params}  # [experts, out, in]
        for p in self.params:  # filled expert by expert while loading
            setattr(self, p, nn.ModuleList(nn.Identity() for _ in range(self.num_experts)))

    def place(self, param: str, expert: int, weight: torch.Tensor, quant: QuantConfig | None,
              device: torch.device) -> None:
        """Set one expert's projection from its fused full-precision matrix (quantised when `quant`)."""
        if quant is not None:
            layer = QuantLinear.from_weight(weight, quant, None, device)
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            layer.weight = nn.Parameter(weight.to(device, copy=True), requires_grad=False)
        getattr(self, param)[expert] = layer

    def add_lora(self, r: int, alpha: float, rslora: bool, dtype: torch.dtype,
                 generator: torch.Generator | None) -> None:
        """One ExpertLora per fused parameter (the router is never adapted)."""
        device = next(self.parameters()).device
        for i, p in enumerate(self.params):
            experts, out_f, in_f = self.shapes[p]
            peft_path = ".".join(["base_layer"] * (len(self.params) - 1 - i))  # see peft_paths
            self.add_module(f"lora_{p}", ExpertLora(experts, in_f, out_f, r, alpha, rslora, dtype, peft_path,
                                                    generator, device))

    def lora(self, param: str) -> ExpertLora | None:
        return self._modules.get(f"lora_{param}")

    def project(self, param: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, param)[expert]
        if isinstance(layer, nn.Linear):  # a QuantLinear casts its input to its compute dtype itself
            x = x.to(layer.weight.dtype)
        y = layer(x)
        lora = self.lora(param)
        if lora is not None and lora.enabled:
            y = y + lora(x, expert).to(y.dtype)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if expert >= self.num_experts:  # transformers' marker for an expert held by another rank
                continue
            token, slot = torch.where(top_k_index == expert)
            gate, up = self.project("gate_up_proj", expert, hidden_states[token]).chunk(2, dim=-1)
            h = self.project("down_proj", expert, self.act_fn(gate) * up)
            h = h * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def base_weight(self, param: str, expert: int) -> torch.Tensor:
        """One expert's frozen matrix in fp32, exactly as the forward pass sees it."""
        layer = getattr(self, param)[expert]
        return layer.dequantize(torch.float32) if isinstance(layer, QuantLinear) else layer.weight.float()

    def merged(self) -> dict[str, torch.Tensor]:
        """{param: [experts, out, in] fp32}: each expert's base plus its adapter delta (when it has one)."""
        out = {}
        for p in self.params:
            lora = self.lora(p)
            out[p] = torch.stack([self.base_weight(p, e) + (lora.delta_weight(e) if lora is not None else 0)
                                  for e in range(self.num_experts)])
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, " + ", ".join(f"{p}={list(s[1:])}" for p, s in self.shapes.items())


def moe_experts(model: nn.Module) -> dict[str, MoeExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoeExperts)}


class ExpertAssembler:
    """Collects checkpoint tensors expert by expert while loading and places each expert as soon as its
    pieces are in: full precision is held for one expert's pieces at a time (plus pieces stored apart
    in the file, e.g. Qwen's down_proj before its gate_proj)."""

    def is_fused(self, name: str) -> bool:
        """A fused expert parameter stored as such (a checkpoint in transformers' in-memory layout)."""
        owner, _, leaf = name.rpartition(".")
        return owner in self.layout.experts and leaf in EXPERT_PARAMS

    def add_fused(self, module: MoeExperts, name: str, tensor: torch.Tensor) -> None:
        """Place every expert of a fused [experts, out, in] checkpoint tensor, one expert at a time."""
        param = name.rpartition(".")[2]
        if tuple(tensor.shape) != module.shapes[param]:
            raise QLoraKitError(f"weight {name} has shape {tuple(tensor.shape)} but the config expects "
                                f"{module.shapes[param]}: the folder's config.json and weights disagree")
        for expert in range(tensor.shape[0]):
            module.place(param, expert, tensor[expert].to(self.dtype, copy=True), self.quant, self.device)

    def __init__(self, layout: ExpertLayout, quant: QuantConfig | None, dtype: torch.dtype, device: torch.device):
        self.layout, self.quant, self.dtype, self.device = layout, quant, dtype, device
        self.pending: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self.placed: dict[str, set[int]] = {}

    def add(self, module: MoeExperts, piece: ExpertPiece, tensor: torch.Tensor) -> bool:
        """Take one piece; True once every expert of its fused parameter is placed."""
        param = piece.param.rpartition(".")[2]
        experts = module.shapes[param][0]
        if piece.expert >= experts:
            raise QLoraKitError(f"checkpoint has expert {piece.expert} for {piece.param}, but the config has "
                                f"{experts} experts: the folder's config.json and weights disagree")
        parts = self.pending.setdefault((piece.param, piece.expert), {})
        parts[piece.pattern] = tensor.to(self.dtype, copy=True)
        if len(parts) < len(piece.converter.source_patterns):
            return False
        del self.pending[(piece.param, piece.expert)]
        fused = self.layout.fuse(piece.converter, parts)
        if tuple(fused.shape) != module.shapes[param][1:]:
            raise QLoraKitError(f"expert {piece.expert} of {piece.param} has shape {tuple(fused.shape)} but the config "
                                f"expects {module.shapes[param][1:]}: the folder's config.json and weights disagree")
        module.place(param, piece.expert, fused, self.quant, self.device)
        done = self.placed.setdefault(piece.param, set())
        done.add(piece.expert)
        return len(done) == experts
