"""A model's shape as the memory plan sees it: the numbers of a config.json that decide memory.

Owns ModelShape, reading a config.json into one (multimodal wrappers included), the preset table
of the popular decoder-only families, resolving a preset name, a model folder, a config.json, a
config or a loaded model to a shape, and which of its linear layers LoRA targets select (by the
one matcher, qlora_kit.modeltree.select_targets, that add_lora uses too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import QLoraKitError, closest
from .modeltree import select_targets
from .models import resolve_model_path


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape, as far as memory is concerned."""

    name: str
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2      # gemma 2/3 have four
    qk_norm: bool = False         # qwen3 / gemma 3 normalise q and k per head
    rotary_tables: int = 1        # gemma 3 has a local and a global rotary embedding
    # mixtures of experts (every block sparse): experts per block, experts per token, expert width,
    # and Qwen2-MoE's always-on shared expert (its width; it has a sigmoid gate of its own)
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(module path inside a block, in_features, out_features, has_bias) for one decoder block's
        linear layers (an MoE block's experts are in expert_linears)."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        attention = [
            ("self_attn.q_proj", h, q, self.qkv_bias),
            ("self_attn.k_proj", h, kv, self.qkv_bias),
            ("self_attn.v_proj", h, kv, self.qkv_bias),
            ("self_attn.o_proj", q, h, self.o_bias),
        ]
        if self.experts:
            si = self.shared_intermediate
            return attention + ([("mlp.shared_expert.gate_proj", h, si, False), ("mlp.shared_expert.up_proj", h, si, False),
                                 ("mlp.shared_expert.down_proj", si, h, False), ("mlp.shared_expert_gate", h, 1, False)]
                                if si else [])
        return attention + [
            ("mlp.gate_proj", h, i, self.mlp_bias),
            ("mlp.up_proj", h, i, self.mlp_bias),
            ("mlp.down_proj", i, h, self.mlp_bias),
        ]

    def expert_linears(self) -> list[tuple[str, int, int, bool]]:
        """One expert's projections (there are `experts` of each per block), as transformers fuses them."""
        if not self.experts:
            return []
        h, ei = self.hidden, self.expert_intermediate
        return [("mlp.experts.gate_up_proj", h, 2 * ei, False), ("mlp.experts.down_proj", ei, h, False)]

    @property
    def mlp_width(self) -> int:
        """The MLP width a token's activations see: a dense MLP's, or top-k experts plus the shared one
        (an MoE block's activations are planned as a dense MLP of that width)."""
        if not self.experts:
            return self.intermediate
        return self.experts_per_token * self.expert_intermediate + self.shared_intermediate

    def expert_parameters(self) -> int:
        """Parameters of one block's experts (all of them), without the router."""
        return self.experts * sum(a * b for _, a, b, _ in self.expert_linears())

    def parameters(self) -> int:
        """Total parameter count (an embedding tied to the head counts once; every expert counts)."""
        per_layer = sum(i * o + (o if b else 0) for _, i, o, b in self.linears())
        per_layer += self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        per_layer += self.expert_parameters() + self.experts * self.hidden  # experts and router
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden + head + self.hidden

    def active_parameters(self) -> int:
        """Parameters one token computes with: the experts it is routed to, not all of them."""
        idle = (self.experts - self.experts_per_token) * sum(a * b for _, a, b, _ in self.expert_linears())
        return self.parameters() - self.layers * idle


# family -> (default tie_word_embeddings, norms per layer, q/k norm, rotary tables)
FAMILIES = {
    "llama": (False, 2, False, 1), "mistral": (False, 2, False, 1), "qwen2": (False, 2, False, 1),
    "qwen3": (True, 2, True, 1), "gemma": (True, 2, False, 1), "gemma2": (True, 4, False, 1),
    "gemma3_text": (True, 4, True, 2), "mixtral": (False, 2, False, 1), "qwen2_moe": (False, 2, False, 1),
    "qwen3_moe": (False, 2, True, 1),
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """Read a config.json (as a dict) into a ModelShape; missing fields are named in the error."""
    if "text_config" in config and "hidden_size" not in config:  # multimodal wrappers (Gemma 3 4B+)
        text = dict(config["text_config"])
        text.setdefault("model_type", config.get("model_type", "") + "_text")
        config = {**text, "tie_word_embeddings": config.get("tie_word_embeddings", text.get("tie_word_embeddings"))}
    missing = [k for k in _REQUIRED if config.get(k) is None]
    if missing:
        raise QLoraKitError(f"{name}: config.json lacks {', '.join(missing)}, which the memory plan needs "
                            "(a decoder-only causal LM config has them all)")
    family = str(config.get("model_type", "llama"))
    if family == "gemma3":
        family = "gemma3_text"
    tied_default, norms, qk_norm, rotary = FAMILIES.get(family, FAMILIES["llama"])
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    tied = config.get("tie_word_embeddings")
    attention_bias = bool(config.get("attention_bias", False))
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    return ModelShape(
        name=name, family=family, hidden=hidden, intermediate=int(config["intermediate_size"]),
        layers=int(config["num_hidden_layers"]), heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
        tied=tied_default if tied is None else bool(tied),
        qkv_bias=True if family in ("qwen2", "qwen2_moe") else attention_bias,
        o_bias=False if family in ("qwen2", "qwen2_moe") else attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        norms_per_layer=norms, qk_norm=qk_norm, rotary_tables=rotary,
        experts=experts, experts_per_token=int(config.get("num_experts_per_tok") or 0) if experts else 0,
        expert_intermediate=int(config.get("moe_intermediate_size") or config["intermediate_size"]) if experts else 0,
        shared_intermediate=int(config.get("shared_expert_intermediate_size") or 0) if experts else 0)


# ---------------------------------------------------------------------------------------------
# Presets: public config.json numbers of the popular families (decoder only)


def _p(family, hidden, inter, layers, heads, kv, vocab, head_dim=None, tied=None, **extra) -> dict:
    cfg = {"model_type": family, "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
           "vocab_size": vocab, **extra}
    if head_dim:
        cfg["head_dim"] = head_dim
    if tied is not None:
        cfg["tie_word_embeddings"] = tied
    return cfg


PRESETS: dict[str, dict] = {
    "llama-65b": _p("llama", 8192, 22016, 80, 64, 64, 32000),          # LLaMA 1, the QLoRA paper's 65B
    "llama-2-7b": _p("llama", 4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": _p("llama", 5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": _p("llama", 8192, 28672, 80, 64, 8, 32000),
    "llama-3.1-8b": _p("llama", 4096, 14336, 32, 32, 8, 128256),
    "llama-3.1-70b": _p("llama", 8192, 28672, 80, 64, 8, 128256),
    "mistral-7b": _p("mistral", 4096, 14336, 32, 32, 8, 32768),         # v0.3
    "qwen2.5-7b": _p("qwen2", 3584, 18944, 28, 28, 4, 152064, tied=False),
    "qwen2.5-14b": _p("qwen2", 5120, 13824, 48, 40, 8, 152064, tied=False),
    "qwen2.5-32b": _p("qwen2", 5120, 27648, 64, 40, 8, 152064, tied=False),
    "qwen2.5-72b": _p("qwen2", 8192, 29568, 80, 64, 8, 152064, tied=False),
    "gemma-2-2b": _p("gemma2", 2304, 9216, 26, 8, 4, 256000, head_dim=256),
    "gemma-2-9b": _p("gemma2", 3584, 14336, 42, 16, 8, 256000, head_dim=256),
    "gemma-2-27b": _p("gemma2", 4608, 36864, 46, 32, 16, 256000, head_dim=128),
    # Gemma 3: the text decoder; the 4B-27B checkpoints also carry a ~0.4B-parameter vision tower.
    "gemma-3-1b": _p("gemma3_text", 1152, 6912, 26, 4, 1, 262144, head_dim=256),
    "gemma-3-4b": _p("gemma3_text", 2560, 10240, 34, 8, 4, 262208, head_dim=256),
    "gemma-3-12b": _p("gemma3_text", 3840, 15360, 48, 16, 8, 262208, head_dim=256),
    "gemma-3-27b": _p("gemma3_text", 5376, 21504, 62, 32, 16, 262208, head_dim=128),
    # Mixtures of experts: intermediate is each expert's width (Mixtral) or the dense one (Qwen)
    "mixtral-8x7b": _p("mixtral", 4096, 14336, 32, 32, 8, 32000, num_local_experts=8, num_experts_per_tok=2),
    "qwen3-30b-a3b": _p("qwen3_moe", 2048, 6144, 48, 32, 4, 151936, head_dim=128, num_experts=128,
                        num_experts_per_tok=8, moe_intermediate_size=768),
}


def resolve_shape(model: Any) -> ModelShape:
    """A ModelShape from a preset name, a model folder or config.json, a config dict or object, or a model."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict):
        return shape_from_config(model)
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):      # a loaded model
        model = model.config
    if hasattr(model, "to_dict"):                                          # a transformers config
        return shape_from_config(model.to_dict(), getattr(model, "name_or_path", "") or "model")
    text = str(model)
    key = text.lower().removeprefix("meta-llama/").removeprefix("qwen/").removeprefix("google/")
    key = key.removeprefix("mistralai/").removesuffix("-hf").removesuffix("-instruct").removesuffix("-it")
    if key in PRESETS:
        return shape_from_config(PRESETS[key], key)
    path = resolve_model_path(text)       # a folder, or 'smollm2' (the packaged demo model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QLoraKitError(f"{path} is not valid JSON: {e}") from None
        return shape_from_config(config, str(path.parent.name or path))
    raise QLoraKitError(f"{text!r} is neither a model folder, a config.json nor a known preset{closest(key, PRESETS)}; "
                        f"presets: {', '.join(PRESETS)}")


def target_layers(shape: ModelShape, targets: str | list[str]) -> list[tuple[str, int, int]]:
    """(full name, in, out) of every linear layer that `targets` selects, named as in the model."""
    layers = {f"model.layers.{i}.{n}": (a, b) for i in range(shape.layers) for n, a, b, _ in shape.linears()}
    return [(name, *layers[name]) for name in select_targets(list(layers), targets)]
