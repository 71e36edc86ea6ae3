"""Finding one's way in a transformers model: its linear layers, its decoder blocks, replacing a
module, and the one rule for which layers get adapters (used by `add_lora` on a model and by the
planner on a config's layer names alike).

Target rules are PEFT's: "all-linear" is every linear layer of the decoder (never the output head),
a list names module-name suffixes (["q_proj", "v_proj"]), a string is a regular expression that
must match a full module name.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import QLoraKitError, closest, first_few
from .moe import MoeExperts
from .quant import QuantLinear

ALL_LINEAR = "all-linear"


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear))


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the decoder's linear layers: every nn.Linear/QuantLinear except the output head, the
    adapters' own lora_A / lora_B, and the per-expert projections inside MoeExperts (experts are
    adapted as PEFT adapts expert parameters, with `target_experts`, never one linear at a time)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    experts = tuple(name + "." for name, m in model.named_modules() if isinstance(m, MoeExperts))
    return [name for name, m in model.named_modules()
            if is_linear(m) and m is not head and not name.endswith(("lora_A", "lora_B"))
            and not (experts and name.startswith(experts))]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is (replacing the module, never patching its forward)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks, in order (model.model.layers for the architectures transformers ships)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise QLoraKitError(f"{type(model).__name__} has no decoder layers where qlora_kit looks for them "
                            "(model.model.layers)")
    return list(layers)


def checkpointed_blocks(gradient_checkpointing: bool | int, layers: int) -> int:
    """How many decoder blocks a gradient_checkpointing setting checkpoints: True all, False none,
    an integer that many (the first ones)."""
    if isinstance(gradient_checkpointing, bool):
        return layers if gradient_checkpointing else 0
    if not isinstance(gradient_checkpointing, int) or not 0 <= gradient_checkpointing <= layers:
        raise QLoraKitError(f"gradient_checkpointing={gradient_checkpointing!r}: use true, false, 'auto' or a "
                            f"number of decoder blocks to checkpoint from 0 to {layers}")
    return gradient_checkpointing


def select_targets(names: list[str], targets: str | list[str]) -> list[str]:
    """The names among `names` (full linear-layer names) that `targets` selects.

    A listed suffix that matches no layer is an error (a typo would otherwise train fewer layers
    than asked), as is a selection that comes out empty; both list the suffixes that exist."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    if targets == ALL_LINEAR:
        chosen = list(names)
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [n for n in names if pattern.fullmatch(n)]
    else:
        def hits(n: str, t: str) -> bool:
            return n == t or n.endswith("." + t)
        unknown = [t for t in targets if not any(hits(n, t) for n in names)]
        if unknown:
            raise QLoraKitError(f"LoRA targets {unknown} match no linear layer{closest(unknown[0], suffixes)}; "
                                f"this model's linear layers end in: {first_few(suffixes, 12)}")
        chosen = [n for n in names if any(hits(n, t) for t in targets)]
    if not chosen:
        raise QLoraKitError(f"LoRA targets {targets!r} match no linear layer of this model; its linear layers "
                            f"end in: {first_few(suffixes, 12)} (use a list of these, a regex over full names, "
                            f"or {ALL_LINEAR!r})")
    return chosen


def match_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Module names of `model` that `targets` selects (see select_targets)."""
    return select_targets(linear_layer_names(model), targets)
