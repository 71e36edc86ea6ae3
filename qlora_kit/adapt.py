"""Putting adapters on a model and folding them back in: the verbs on a whole model.

    add_lora(model, config)      wrap the targeted linear layers in LoraLinear, freeze the rest
    merged_state_dict(model)     W + scale * B @ A per adapted layer (fp32, then cast); model unchanged
    merge_lora(model)            a plain transformers model with the adapters merged in
    trainable_parameters(model)  (trainable, total) counts
    adapters_disabled(model)     a context in which the model is its frozen base again

With LoRA the reference model of DPO-style preference tuning costs nothing: it is the same model
with every adapter switched off, so no second copy of the (4-bit) base is ever held.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator

import torch
from torch import nn

from .dtypes import as_dtype
from .errors import QLoraKitError, first_few
from .inits import check_init_fits, initialise
from .lora import LoraConfig, LoraLinear, expert_loras, lora_layers
from .modeltree import match_targets, set_module
from .moe import moe_experts
from .quant import QuantLinear
from .record import record_of


def add_lora(model: nn.Module, config: LoraConfig | None = None) -> nn.Module:
    """Wrap the targeted linear layers in LoraLinear (in place) and freeze everything else.

    Returns the model for chaining. The model's record (qlora_kit.record) keeps `config`."""
    config = config or LoraConfig()
    if config.dtype == "auto":
        config = replace(config, dtype=model.get_input_embeddings().weight.dtype)
    if lora_layers(model) or expert_loras(model):
        raise QLoraKitError("this model already has LoRA adapters; load a fresh base to add new ones")
    experts = moe_experts(model)
    if config.target_experts and not experts:
        raise QLoraKitError("target_experts=True, but this model has no mixture-of-experts layers qlora_kit adapts "
                            "(Mixtral, Qwen2-MoE, Qwen3-MoE loaded with qlora_kit.load_model): drop target_experts")
    names = match_targets(model, config.targets)
    check_init_fits(model, names, config)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer = LoraLinear(base, config.r, config.alpha, config.dropout, config.rslora, config.dtype, generator,
                           config.shared_dropout)
        set_module(model, name, layer.train(model.training))  # an eval-mode model gets no dropout
    if config.target_experts:
        for module in experts.values():
            module.add_lora(config.r, config.alpha, config.rslora, config.dtype, generator)
    record = record_of(model)
    initialise({name: model.get_submodule(name) for name in names}, config, record.source)
    record.lora = config
    return model




def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantised weight counts as its full matrix."""
    packed = {id(m.weight) for m in model.modules() if isinstance(m, QuantLinear)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters() if id(p) not in packed)
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return trainable, total


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full-precision state dict with every adapter folded in (W + scale * B @ A in fp32, then cast).

    Quantised weights are dequantised, never re-quantised. The model itself is left untouched,
    so training can go on afterwards."""
    out: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    for name, m in moe_experts(model).items():  # fused [experts, out, in] parameters, as transformers holds them
        out.update({f"{name}.{p}": w.to(dtype) for p, w in m.merged().items()})
        handled.add(name)
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            w = m.base_weight() + m.delta_weight()
            out[f"{name}.weight"] = w.to(dtype)
            if m.base_layer.bias is not None:
                out[f"{name}.bias"] = m.base_layer.bias.detach().to(dtype)
            handled.add(name)
        elif isinstance(m, QuantLinear) and not any(name.startswith(h + ".") for h in handled):
            out[f"{name}.weight"] = m.dequantize(torch.float32).to(dtype)
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias.detach().to(dtype)
            handled.add(name)
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if any(owner == h or owner.startswith(h + ".") for h in handled):
            continue
        out[key] = t.detach().to(dtype) if t.is_floating_point() else t
    return out


def merge_lora(model: nn.Module, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """A new plain transformers model with the adapters merged in (the input model is unchanged).

    Holds a full-precision copy in memory: for large models use `export_merged`, which streams."""
    from transformers import AutoModelForCausalLM

    dtype = as_dtype(dtype)
    state = merged_state_dict(model, dtype)
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        merged = AutoModelForCausalLM.from_config(config, dtype=dtype)
    merged.load_state_dict(state, strict=False, assign=True)
    merged.tie_weights()
    _materialise_buffers(merged, model)
    return merged.eval()


def _materialise_buffers(target: nn.Module, source: nn.Module) -> None:
    """Copy non-persistent buffers (rotary tables) that a meta-device build left empty."""
    src = dict(source.named_buffers())
    for name, buf in list(target.named_buffers()):
        if buf.is_meta and name in src:
            parent, _, leaf = name.rpartition(".")
            owner = target.get_submodule(parent) if parent else target
            owner._buffers[leaf] = src[name].clone()
    leftover = [n for n, t in list(target.named_parameters()) + list(target.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"merged model has tensors that were never filled: {first_few(leftover)}")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoraLinear computes its frozen base alone (the model without adapters);
    each adapter's previous state is restored on leaving, also after an error."""
    layers = {**lora_layers(model), **expert_loras(model)}
    if not layers:
        raise QLoraKitError("this model has no LoRA adapters to disable: add_lora(model, ...) first")
    before = {name: layer.enabled for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.enabled = False
        yield model
    finally:
        for name, layer in layers.items():
            layer.enabled = before[name]
