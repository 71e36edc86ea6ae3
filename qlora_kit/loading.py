"""Load a local Hugging Face model with its linear weights quantised as they are read.

The model is built on the meta device (no memory), then each tensor is read from the safetensors
shards one at a time (memory-mapped): decoder linear weights are quantised straight away on the
target device, everything else (embeddings, norms, lm_head) is copied in the compute dtype. The
full-precision model never exists in memory, and no tensor the model keeps views a shard, so only
one shard is mapped at a time: peak memory stays near the quantised size plus one shard's pages and
one tensor's temporaries. Nothing is unpickled; remote code runs only when asked for.

Checkpoint keys reach the model through transformers' own checkpoint conversion mapping (see
qlora_kit.moe): for mixture-of-experts models it renames (Mixtral's block_sparse_moe -> mlp) and
fuses each expert's tensors, which are quantised one expert at a time into a MoeExperts module.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import QLoraKitError, first_few
from .memory import configure_allocator, release_after_block, release_freed_memory
from .modeltree import checkpointed_blocks, decoder_layers, linear_layer_names, set_module
from .dtypes import resolve_dtype
from .moe import ExpertAssembler, ExpertLayout, MoeExperts
from .norms import fuse_norms
from .quant import QuantConfig, QuantLinear
from .record import record_of
from .tensorfiles import count_tensors, iter_safetensors, safetensors_files


def load_config(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    safetensors_files(path)
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, OSError, json.JSONDecodeError, KeyError) as e:
        raise QLoraKitError(f"could not read {Path(path) / 'config.json'}: {e}") from None


def build_empty_model(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model's modules with parameters on the meta device and real (computed) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise QLoraKitError(f"transformers cannot build a causal LM from this config: {e}") from None


def load_model(path: str | Path, quant: QuantConfig | None = QuantConfig(), device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
               load_tokenizer: bool = True, progress: bool = True):
    """Load a local Hugging Face causal LM, quantised and frozen, and its tokenizer.

    quant: a QuantConfig (4-bit NF4 by default), or None for an unquantised base.
    dtype: dtype of unquantised weights and activations; defaults to quant.compute_dtype, where
        "auto" means bf16 on hardware that is fast at it (else fp16 on old GPUs, fp32 on AVX2 CPUs).
    Returns (model, tokenizer); tokenizer is None when load_tokenizer is False.
    """
    path = Path(path)
    files = safetensors_files(path)
    configure_allocator()  # host RAM: how freed tensors go back to the system (see memory.py)
    device = torch.device(device)
    dtype = resolve_dtype(dtype if dtype is not None else (quant.compute_dtype if quant else "auto"), device)
    if quant is not None:
        quant = replace(quant, compute_dtype=dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QLoraKitError("device='cuda' was asked for but torch sees no CUDA GPU: use device='cpu' "
                            "or install a CUDA build of torch")
    config = load_config(path, trust_remote_code)
    model = build_empty_model(config, dtype, trust_remote_code)
    expected = {k for k in model.state_dict()}
    tied = _tied_keys(model)
    # checkpoint keys -> model keys by transformers' own conversion mapping (MoE experts: many -> one)
    layout = ExpertLayout(model)
    for name, module in layout.experts.items():
        set_module(model, name, MoeExperts(module))
    experts = ExpertAssembler(layout, quant, dtype, device)
    quantised = set(linear_layer_names(model)) if quant is not None else set()

    pending_bias: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    bar = tqdm(total=count_tensors(files), desc="loading", unit="tensor", disable=not progress, leave=False)
    for key, tensor in iter_safetensors(files):
        # `tensor` views its shard's memory map. While any view lives, the whole shard stays mapped,
        # with every page read from it resident: the model keeps copies only (_owned), and the view
        # is dropped before the next one is read, so the next shard never opens beside this one.
        name, piece = layout.locate(key)
        owner, _, leaf = name.rpartition(".")
        if piece is not None and name in expected:
            if experts.add(model.get_submodule(owner), piece, tensor):
                seen.add(name)
        elif experts.is_fused(name) and name in expected:
            experts.add_fused(model.get_submodule(owner), name, tensor)
            seen.add(name)
        elif owner in quantised and leaf == "weight":
            _check_shape(key, tensor, model.get_submodule(owner).weight)
            bias = pending_bias.pop(owner, None)
            layer = QuantLinear.from_weight(tensor.to(dtype), quant, bias, device)
            set_module(model, owner, layer)
            quantised.discard(owner)
            seen.add(name)
        elif name in expected:
            value = _owned(tensor, device, dtype if tensor.is_floating_point() else None)
            if owner in quantised and leaf == "bias":
                pending_bias[owner] = value
            else:
                _assign(model, name, value)
            seen.add(name)
        else:
            unexpected.append(key)
        del tensor
        bar.update()
    bar.close()

    missing = sorted(expected - seen - set(tied))
    if missing:
        raise QLoraKitError(f"{path} does not match its config: weights missing for {first_few(missing)}")
    if unexpected:
        warnings.warn(f"ignored {len(unexpected)} tensors the model does not use: {first_few(unexpected)}")
    if tied:
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    fuse_norms(model)  # each RMSNorm one autograd node that saves its 16-bit input (norms.py)
    if device.type != "cpu":
        model.to(device)  # the computed buffers (rotary tables) were built on the CPU
    record = record_of(model)
    record.quant = quant
    record.source = path  # inits that change the base (svd, loftq) re-read weights from here
    model.eval()
    tokenizer = load_tokenizer_from(path) if load_tokenizer else None
    release_freed_memory()  # the load's scratch (converted and quantised copies) leaves the resident set
    return model, tokenizer


def _tied_keys(model: nn.Module) -> list[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return list(tied.keys() if isinstance(tied, dict) else tied)


def _owned(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` on `device` in `dtype`, in memory of its own.

    A plain `.to()` returns its input when device and dtype already match, and a tensor read from a
    shard is a view into that shard's memory map: one such view kept by the model (a bf16 norm under
    bf16 compute) kept the whole shard mapped, and on a Llama-2-7B-shaped checkpoint a bf16 load
    ended with 12.2 GiB of checkpoint pages resident beside 3.4 GiB of model."""
    return tensor.to(device=device, dtype=dtype, copy=True)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if isinstance(module, QuantLinear) and leaf == "bias":  # a bias stored after its quantised weight
        module.bias = nn.Parameter(tensor.to(module.compute_dtype), requires_grad=False)
    elif leaf in module._parameters:
        _check_shape(key, tensor, module._parameters[leaf])
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def _check_shape(key: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
    if tuple(expected.shape) != tuple(tensor.shape):
        raise QLoraKitError(f"weight {key} has shape {tuple(tensor.shape)} but the config expects "
                            f"{tuple(expected.shape)}: the folder's config.json and weights disagree")


def load_tokenizer_from(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise QLoraKitError(f"could not load a tokenizer from {path}: {e}; pass load_tokenizer=False "
                            "to load the model alone") from None


def set_gradient_checkpointing(model: nn.Module, enabled: bool | int = True) -> None:
    """Recompute decoder blocks in the backward pass (non-reentrant), or stop doing so.

    enabled: True for every block, False for none, or a number of blocks: the first ones, whose
    recomputation comes last in the backward pass, when the unchecked blocks have freed their
    internals (qlora_kit.plan picks that number for a memory budget). On the CPU the heap is trimmed
    after each unchecked block's forward pass and each block's backward pass (qlora_kit.memory), so
    the peak is the plan's."""
    layers = decoder_layers(model)
    blocks = checkpointed_blocks(enabled, len(layers))
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names
        model.activation_checkpointing_enable(kwargs) if blocks else model.activation_checkpointing_disable()
    elif blocks:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
    for i, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i < blocks
        release_after_block(layer, forward=i >= blocks, backward=True)
    model.config.use_cache = not blocks
