"""What llama.cpp needs to know about each architecture we train, and the few places where its
tensor layout differs from Hugging Face's.

Names come from the `gguf` package (llama.cpp's own Python package): the architecture names
(`gguf.MODEL_ARCH_NAMES`), the tensor names (`gguf.get_tensor_name_map`, which knows the Hugging
Face spellings of every tensor llama.cpp loads) and the metadata keys (GGUFWriter's `add_*`), so a
llama.cpp that renames something arrives with a `gguf` upgrade instead of a patch here.

What is ours: which Hugging Face `model_type` is which llama.cpp architecture, which config fields
become which metadata, and three layout differences:
- rope pairs: llama.cpp's "normal" rope (Llama, Mistral, Mixtral, Granite) rotates adjacent pairs
  of dimensions (x0, x1), (x2, x3)... while Hugging Face rotates the two halves of each head
  (x_i, x_{i+d/2}); each head's q/k rows are reordered from [first half; second half] to
  interleaved pairs (transformers undoes it when it reads such a GGUF). The other architectures
  use llama.cpp's NeoX rope, the halves layout, and go in as they are.
- Gemma's norms compute x * (1 + w); llama.cpp's compute x * w, so 1 is added to each norm weight.
- MoE checkpoints store one tensor per expert (`...experts.3.w1.weight`); llama.cpp wants one 3-D
  tensor per layer and projection (`blk.N.ffn_gate_exps`, experts stacked on the first axis).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QLoraKitError, first_few

Q8_BLOCK, Q8_BYTES = 32, 34  # q8_0: 32 int8 weights and one fp16 scale per block
_EXPERT = re.compile(r"\.experts\.(\d+)\.")  # one expert's tensor in a checkpoint's per-expert layout


@dataclass(frozen=True)
class Arch:
    """One Hugging Face model_type as llama.cpp sees it."""

    gguf: str  # member of gguf.MODEL_ARCH
    rope_pairs: bool = False  # llama.cpp's normal rope: q/k rows reordered (module docstring)
    norm_plus_one: bool = False  # Gemma's (1 + w) norms
    activation: str = "silu"  # the hidden_act llama.cpp's graph for this architecture computes
    # transformers reads this architecture's GGUF back (its GGUF loader lacks some; mixtral is
    # llama.cpp's "llama" with experts, which transformers would read as a dense Llama)
    transformers_reads: bool = True


ARCHITECTURES = {
    "llama": Arch("LLAMA", rope_pairs=True),
    "mistral": Arch("LLAMA", rope_pairs=True),  # a Llama to llama.cpp (its sliding window unused)
    "mixtral": Arch("LLAMA", rope_pairs=True, transformers_reads=False),
    "granite": Arch("GRANITE", rope_pairs=True, transformers_reads=False),
    "qwen2": Arch("QWEN2"),
    "qwen2_moe": Arch("QWEN2MOE"),
    "qwen3": Arch("QWEN3"),
    "qwen3_moe": Arch("QWEN3MOE"),
    "gemma": Arch("GEMMA", norm_plus_one=True, activation="gelu_pytorch_tanh", transformers_reads=False),
    "gemma2": Arch("GEMMA2", norm_plus_one=True, activation="gelu_pytorch_tanh"),
    "gemma3_text": Arch("GEMMA3", norm_plus_one=True, activation="gelu_pytorch_tanh"),
    "phi3": Arch("PHI3"),
    "olmo2": Arch("OLMO2", transformers_reads=False),
}
# rope scalings llama.cpp computes from metadata (linear) or from a rope_freqs tensor (llama3)
_ROPE_TYPES = {"default", "linear", "llama3"}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF file: its name, numpy-order shape, GGML type, and the base keys it is
    made of (one, or every expert's for a stacked tensor; none for a tensor computed from the config)."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    sources: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        from gguf import GGMLQuantizationType as Q

        n = math.prod(self.shape)
        return n // Q8_BLOCK * Q8_BYTES if self.qtype == Q.Q8_0 else n * (4 if self.qtype == Q.F32 else 2)


def read_config(base: Path) -> dict:
    """config.json, checked to describe a model llama.cpp can run, with the fields the writer needs
    resolved: arch, head_dim, num_key_value_heads, rope (the full-attention rope), rope_swa."""
    if not (base / "config.json").is_file():
        raise QLoraKitError(f"{str(base)!r} is not a model folder: it has no config.json")
    config = json.loads((base / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise QLoraKitError(f"cannot write {model_type!r} models to GGUF: the GGUF export supports "
                            f"{', '.join(ARCHITECTURES)}; export to safetensors (--format safetensors) and "
                            "convert with llama.cpp's convert_hf_to_gguf.py")
    arch = ARCHITECTURES[model_type]
    act = config.get("hidden_activation") or config.get("hidden_act", arch.activation)
    if act != arch.activation:
        raise QLoraKitError(f"{base}: hidden_act {act!r}; llama.cpp's {model_type} computes {arch.activation}, so "
                            "the GGUF would compute another model")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    swa = None
    if "full_attention" in rope:  # Gemma 3: one rope per attention kind
        rope, swa = rope["full_attention"], rope.get("sliding_attention")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES or (rope_type == "llama3" and not arch.rope_pairs):
        raise QLoraKitError(f"{base}: rope scaling {rope_type!r} is not written by the GGUF export (default, linear "
                            "and Llama 3's llama3 are); export to safetensors and convert with llama.cpp's "
                            "convert_hf_to_gguf.py")
    config["arch"] = arch
    config.setdefault("head_dim", None)
    config["head_dim"] = config["head_dim"] or config["hidden_size"] // config["num_attention_heads"]
    config["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    config["rope"] = rope | {"rope_type": rope_type,
                             "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0))}
    config["rope_swa"] = swa
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and model_type in ("gemma2", "gemma3_text") and \
            scalar not in (config["head_dim"], config["hidden_size"] // config["num_attention_heads"]):
        # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B models); no key changes it
        raise QLoraKitError(f"{base}: query_pre_attn_scalar {scalar} is neither head_dim ({config['head_dim']}) nor "
                            "hidden_size / num_attention_heads, the attention scales llama.cpp's Gemma computes; "
                            "export to safetensors (--format safetensors) instead")
    return config


def transformers_cannot_read(config: dict) -> str | None:
    """Why transformers' GGUF reader cannot rebuild this model, or None when it can (then the export
    is verified against it; otherwise only llama.cpp can check the file)."""
    if not config["arch"].transformers_reads:
        return f"transformers' GGUF reader cannot rebuild a {config['model_type']} model"
    if config["rope"]["rope_type"] == "llama3":
        return "transformers' GGUF reader ignores rope_freqs, so it would compute Llama 3 with plain rope"
    return None


def gguf_arch(config: dict):
    """The `gguf.MODEL_ARCH` member for this config."""
    import gguf

    return gguf.MODEL_ARCH[config["arch"].gguf]


def write_hparams(writer, config: dict) -> None:
    """The architecture's hyperparameters, under the keys llama.cpp reads for it."""
    from gguf import RopeScalingType

    c, rope = config, config["rope"]
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_rope_dimension_count(int(c["head_dim"] * c.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if c["rope_swa"]:
        writer.add_rope_freq_base_swa(float(c["rope_swa"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(c["vocab_size"])

    if c.get("sliding_window") and c["model_type"] in ("gemma2", "gemma3_text"):
        writer.add_sliding_window(c["sliding_window"])
    if c.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(float(c["attn_logit_softcapping"]))
    if c.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
    if c["model_type"] == "granite":  # Granite scales embeddings, residuals, attention and logits
        writer.add_embedding_scale(float(c["embedding_multiplier"]))
        writer.add_residual_scale(float(c["residual_multiplier"]))
        writer.add_attention_scale(float(c["attention_multiplier"]))
        writer.add_logit_scale(float(c["logits_scaling"]))
    experts = c.get("num_local_experts") or c.get("num_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(c["num_experts_per_tok"])
        if c.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(c["moe_intermediate_size"])
        if c.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])


# ---------------------------------------------------------------- tensors

def tensor_layout(plan: list[tuple[str, tuple[int, ...], torch.dtype]], config: dict, gguf_type: str) -> list[GGUFTensor]:
    """The file's tensors in the order they are written: computed ones first, then each as soon as
    the last of its base tensors has streamed by (a stacked expert tensor after its last expert).
    A tied lm_head and rotary buffers are left out; a tensor llama.cpp has no name for is an error."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    names = gguf.get_tensor_name_map(gguf_arch(config), config["num_hidden_layers"])
    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]
    groups: dict[str, list] = {}  # GGUF name -> [shape of one source, its sources, position of the last]
    unknown = []
    for position, (key, shape, dtype) in enumerate(plan):
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.get("tie_word_embeddings")):
            continue
        name = names.get_name(_EXPERT.sub(".experts.", key), try_suffixes=(".weight", ".bias"))
        if name is None or not dtype.is_floating_point:
            unknown.append(key)
            continue
        group = groups.setdefault(name, [shape, [], 0])
        group[1].append(key)
        group[2] = position
    if "lm_head.weight" in unknown and gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[gguf_arch(config)]:
        raise QLoraKitError(f"llama.cpp's {config['model_type']} always ties the output layer to the embeddings, but "
                            "this model has its own lm_head.weight (tie_word_embeddings is false); export to "
                            "safetensors (--format safetensors) instead")
    if unknown:
        raise QLoraKitError(f"the base holds tensors llama.cpp's {config['model_type']} has no name for: "
                            f"{first_few(unknown)}; export to safetensors and convert with llama.cpp's "
                            "convert_hf_to_gguf.py")
    tensors = [GGUFTensor(_rope_freqs_name(), (config["head_dim"] // 2,), Q.F32, ())] if _has_rope_freqs(config) else []
    for name, (shape, sources, _) in sorted(groups.items(), key=lambda item: item[1][2]):
        if _EXPERT.search(sources[0]):
            sources = sorted(sources, key=lambda k: int(_EXPERT.search(k).group(1)))
            shape = (len(sources), *shape)
        elif len(sources) > 1:
            raise QLoraKitError(f"the base holds several tensors llama.cpp names {name}: {first_few(sources)}")
        # vectors, and the MoE router (which decides which experts run), stay f32 as llama.cpp's converter keeps them
        qtype = Q.F32 if len(shape) == 1 or ".ffn_gate_inp" in name else wanted
        if qtype == Q.Q8_0 and shape[-1] % Q8_BLOCK:
            qtype = Q.F16  # llama.cpp's converter does the same for rows that do not fill whole blocks
        tensors.append(GGUFTensor(name, tuple(shape), qtype, tuple(sources)))
    return tensors


def _rope_freqs_name() -> str:
    import gguf

    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def _has_rope_freqs(config: dict) -> bool:
    return config["rope"]["rope_type"] == "llama3"


def computed_tensor(tensor: GGUFTensor, config: dict) -> torch.Tensor:
    """A tensor made from the config, not the checkpoint: Llama 3's rope_freqs.

    Llama 3 divides each rotary frequency by a factor that depends on its wavelength: 1 for short
    wavelengths, `factor` for long ones, a smooth blend between. llama.cpp reads those divisors from
    the rope_freqs tensor (one per pair of dimensions) instead of recomputing them."""
    rope, dim = config["rope"], config["head_dim"]
    inv_freq = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, old = float(rope["factor"]), float(rope["original_max_position_embeddings"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old / wavelen - low) / (high - low)).clamp(0, 1)  # 0: long wavelengths, 1: short ones
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    divisor = torch.where(wavelen < old / high, torch.ones_like(divisor), divisor)
    divisor = torch.where(wavelen > old / low, torch.full_like(divisor, factor), divisor)
    return divisor.float()


def to_llama_cpp(tensor: GGUFTensor, w: torch.Tensor, config: dict) -> torch.Tensor:
    """One merged tensor (experts already stacked) in llama.cpp's layout (module docstring)."""
    arch, name = config["arch"], tensor.name
    if arch.rope_pairs and (".attn_q." in name or ".attn_k." in name):
        heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
        rows = w.shape[0]
        w = w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    if arch.norm_plus_one and w.dim() == 1 and name.removesuffix(".weight").endswith("norm"):
        w = w + 1
    return w
