"""GGUF export of every architecture we train: the file read back with the `gguf` package (llama.cpp's
names, shapes, types, metadata), and, where llama_cpp is installed, run in llama.cpp against the
merged model's logits."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from safetensors.torch import load_file, save_file

from qlora_kit import QLoraKitError, export_gguf, export_merged
from qlora_kit.export import format_gguf_report
from test_export import trained_adapter
from tiny import ARCHS

QUIET = dict(progress=False)
DENSE = ["llama", "mistral", "qwen2", "llama-tied", "llama3-rope", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
         "olmo2", "granite"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
# llama.cpp's architecture names, written out here so the test does not read them from the code it checks
LLAMA_CPP_ARCH = {"llama": "llama", "mistral": "llama", "llama-tied": "llama", "llama3-rope": "llama",
                  "mixtral": "llama", "granite": "granite", "qwen2": "qwen2", "qwen2_moe": "qwen2moe", "qwen3": "qwen3",
                  "qwen3_moe": "qwen3moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
                  "phi3": "phi3", "olmo2": "olmo2"}
# f16 GGUF in llama.cpp against the fp32 merged model in transformers, relative Frobenius error of the
# next-token logits: f16 weights plus llama.cpp's own f16/f32 kernels
LLAMA_CPP_TOLERANCE = 3e-2


def peft_adapter(base, out, modules=("q_proj", "k_proj", "v_proj", "o_proj"), r=4, seed=1, b_std=0.05):
    """A trained-looking LoRA adapter (non-zero B) on the named projections, written directly in PEFT's
    layout and recorded as trained on the unquantised base: for models the 4-bit loader cannot take yet."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        for key in f.keys():
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module.rsplit(".", 1)[-1] in modules:
                rows, cols = f.get_slice(key).get_shape()
                tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, cols, generator=g) * 0.1
                tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(rows, r, generator=g) * b_std
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": list(modules), "qlora_kit": {"quant": None}}))
    return out


@pytest.fixture(scope="module")
def exported(tiny_dirs, tmp_path_factory):
    """(base, merged fp32 folder, f16 GGUF, report) per architecture, built once."""
    root = tmp_path_factory.mktemp("gguf-archs")
    made = {}

    def get(arch):
        if arch not in made:
            base = tiny_dirs(arch)
            adapter = root / f"{arch}-adapter"
            if arch in MOE:
                peft_adapter(base, adapter)
            else:
                trained_adapter(base, adapter)
            export_merged(base, adapter, root / f"{arch}-merged", dtype="fp32", verify=False, **QUIET)
            # a neutral file name: llama.cpp and transformers special-case some names ("phi3", "mistral")
            out = root / arch / "exported.gguf"
            out.parent.mkdir()
            report = export_gguf(base, adapter, out, **QUIET)
            made[arch] = base, root / f"{arch}-merged", out, report
        return made[arch]

    return get


def fields(path) -> dict:
    return {name: f.contents() for name, f in GGUFReader(path).fields.items() if not name.startswith("GGUF.")}


def llama_cpp_names(arch_name: str) -> set[str]:
    """Every tensor name llama.cpp's architecture has, from the gguf package's table, as patterns."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    return {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_every_architecture_writes_llama_cpp_names_and_metadata(exported, arch):
    base, _, path, report = exported(arch)
    config = json.loads((base / "config.json").read_text())
    meta, reader = fields(path), GGUFReader(path)
    name = LLAMA_CPP_ARCH[arch]
    assert meta["general.architecture"] == name and report["architecture"] == name
    assert meta[f"{name}.block_count"] == 2 and meta[f"{name}.embedding_length"] == 64
    assert meta[f"{name}.attention.head_count_kv"] == 2
    allowed = llama_cpp_names(name)
    tensors = {t.name: t for t in reader.tensors}
    for t in tensors:  # blk.1.attn_q.weight -> blk.{bid}.attn_q
        pattern = t.rsplit(".", 1)[0].replace("blk.0.", "blk.{bid}.").replace("blk.1.", "blk.{bid}.")
        assert pattern in allowed, f"{t} is not a tensor llama.cpp's {name} loads"
    tied = config.get("tie_word_embeddings", False)
    assert ("output.weight" in tensors) == (not tied)
    assert tensors["token_embd.weight"].tensor_type == Q.F16 and tensors["output_norm.weight"].tensor_type == Q.F32
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eot_token_id"] == 2 and meta["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def _tensor(reader: GGUFReader, name: str) -> np.ndarray:
    """A tensor's values in numpy order (the reader gives ggml's order reversed, as written)."""
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])


def test_llama3_rope_scaling_is_the_rope_freqs_tensor(exported):
    """llama.cpp divides each rotary frequency by rope_freqs[i]: the ratio of plain to Llama 3 frequencies."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base, _, path, report = exported("llama3-rope")
    config = AutoConfig.from_pretrained(str(base))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    freqs = _tensor(GGUFReader(path), "rope_freqs.weight")
    assert freqs.shape == (8,) and next(t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight").tensor_type == Q.F32
    np.testing.assert_allclose(freqs, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert freqs[0] == 1.0 and freqs[-1] == 8.0 and 1.0 < freqs[1] < 8.0  # all three bands occur
    assert "skipped" in report["verify"] and "rope" in report["verify"]["skipped"]


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_norms_are_one_plus_w(exported, arch):
    base, _, path, _ = exported(arch)
    stored = load_file(str(base / "model.safetensors"))
    reader = GGUFReader(path)
    np.testing.assert_allclose(_tensor(reader, "blk.0.attn_norm.weight"),
                               stored["model.layers.0.input_layernorm.weight"].float().numpy() + 1, rtol=1e-6)
    np.testing.assert_allclose(_tensor(reader, "output_norm.weight"),
                               stored["model.norm.weight"].float().numpy() + 1, rtol=1e-6)
    if arch != "gemma":  # the norms after attention and after the MLP
        np.testing.assert_allclose(_tensor(reader, "blk.1.post_ffw_norm.weight"),
                                   stored["model.layers.1.post_feedforward_layernorm.weight"].float().numpy() + 1,
                                   rtol=1e-6)


def test_architecture_metadata(exported):
    gemma2 = fields(exported("gemma2")[2])
    assert gemma2["gemma2.attn_logit_softcapping"] == 50.0 and gemma2["gemma2.final_logit_softcapping"] == 30.0
    assert gemma2["gemma2.attention.sliding_window"] == 8
    gemma3 = fields(exported("gemma3_text")[2])
    assert gemma3["gemma3.attention.sliding_window"] == 8 and gemma3["gemma3.rope.freq_base"] == 1e6
    granite = fields(exported("granite")[2])
    assert (granite["granite.embedding_scale"], granite["granite.residual_scale"], granite["granite.attention.scale"],
            granite["granite.logit_scale"]) == (2.0, 0.5, 0.25, 4.0)
    phi3 = {t.name: t for t in GGUFReader(exported("phi3")[2]).tensors}
    # fused as Hugging Face's Phi-3 stores them: q, k, v rows stacked; gate and up rows stacked
    assert tuple(reversed(phi3["blk.0.attn_qkv.weight"].shape.tolist())) == (64 + 2 * 2 * 16, 64)
    assert tuple(reversed(phi3["blk.0.ffn_up.weight"].shape.tolist())) == (2 * 88, 64)


@pytest.mark.parametrize("arch", MOE)
def test_experts_are_stacked_per_layer(exported, arch):
    base, merged, path, report = exported(arch)
    meta, reader = fields(path), GGUFReader(path)
    name = LLAMA_CPP_ARCH[arch]
    assert meta[f"{name}.expert_count"] == 4 and meta[f"{name}.expert_used_count"] == 2
    spec = ARCHS[arch]   # the tiny model's expert widths
    moe_ff = 88 if arch == "mixtral" else spec["moe_intermediate_size"]
    if arch != "mixtral":
        assert meta[f"{name}.expert_feed_forward_length"] == moe_ff
    stored = load_file(str(base / "model.safetensors"))
    layout = {"mixtral": "model.layers.1.block_sparse_moe.experts.{e}.w1.weight"}.get(
        arch, "model.layers.1.mlp.experts.{e}.gate_proj.weight")
    gate = _tensor(reader, "blk.1.ffn_gate_exps.weight")
    assert gate.shape == (4, moe_ff, 64) and _tensor(reader, "blk.1.ffn_down_exps.weight").shape == (4, 64, moe_ff)
    for e in range(4):  # expert e's merged weight (experts carry no adapter here), in f16
        np.testing.assert_allclose(gate[e], stored[layout.format(e=e)].float().numpy(), rtol=1e-3, atol=1e-3)
    router = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_inp.weight")
    assert router.tensor_type == Q.F32
    if arch == "qwen2_moe":  # the shared expert and its gate
        assert _tensor(reader, "blk.0.ffn_gate_shexp.weight").shape == (spec["shared_expert_intermediate_size"], 64)
        assert "blk.0.ffn_gate_inp_shexp.weight" in {t.name for t in reader.tensors}
    assert report["adapted_modules"] == 8


def test_experts_are_streamed_one_layer_at_a_time(exported, tmp_path, monkeypatch):
    """Stacking holds one layer's experts at most, never the model's."""
    import qlora_kit.export.gguf as gguf_export

    base, _, _, _ = exported("mixtral")
    held = []
    original = torch.stack

    def counting_stack(tensors, *a, **k):
        held.append(len(tensors))
        return original(tensors, *a, **k)

    monkeypatch.setattr(gguf_export.torch, "stack", counting_stack)
    report = export_gguf(base, peft_adapter(base, tmp_path / "a"), tmp_path / "m.gguf", verify=False, **QUIET)
    # (torch.stack is patched for everyone: the merge's own one-expert fusing shows up as stacks of 1)
    assert max(held) == 4 and held.count(4) == 6 and report["tensors"] == 2 * (4 + 2 + 3 + 1) + 3


# transformers cannot read these back from GGUF: no GGUF reader for the architecture (gemma, olmo2,
# granite), rope_freqs ignored (llama3-rope), a dense Llama where llama.cpp has experts (mixtral), a head_dim
# other than hidden/heads dropped (qwen3, qwen3_moe), expert sizes dropped (qwen2_moe), or
# query_pre_attn_scalar left at its default (the tiny gemma2 / gemma3)
NOT_READ_BY_TRANSFORMERS = {"gemma", "olmo2", "granite", "llama3-rope", "mixtral", "qwen3", "qwen3_moe", "qwen2_moe",
                            "gemma2", "gemma3_text"}


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_verified_by_transformers_where_it_reads_gguf(exported, arch):
    """Where transformers' GGUF reader cannot rebuild the model, the export says so instead of failing."""
    _, _, _, report = exported(arch)
    if arch in NOT_READ_BY_TRANSFORMERS:
        assert "not verified by transformers" in report["verify"]["skipped"]
        assert "not verified by transformers" in format_gguf_report(report)
    else:
        assert report["verify"]["logit_rel_error"] < 2e-3


# ---------------------------------------------------------------- llama.cpp itself

def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    model.eval(ids)
    return torch.tensor(np.array(model.scores[: len(ids)]), dtype=torch.float32)


def merged_logits(folder, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_llama_cpp_runs_the_gguf_as_the_merged_model(exported, arch):
    pytest.importorskip("llama_cpp")
    _, merged, path, _ = exported(arch)
    ids = torch.randint(4, 320, (16,), generator=torch.Generator().manual_seed(7)).tolist()
    ours, reference = llama_cpp_logits(path, ids), merged_logits(merged, ids)
    error = float(torch.linalg.vector_norm(ours - reference) / torch.linalg.vector_norm(reference))
    print(f"{arch}: llama.cpp vs merged model, relative logit error {error:.2e}")
    assert error < LLAMA_CPP_TOLERANCE


# ---------------------------------------------------------------- what it cannot take

@pytest.mark.parametrize("arch,change,message", [
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
     "rope scaling 'yarn' is not written by the GGUF export"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                  "long_factor": [2.0] * 8, "partial_rotary_factor": 1.0}},
     "rope scaling 'longrope' is not written"),
    ("qwen2", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}},
     "rope scaling 'llama3' is not written"),  # Llama 3 scaling outside llama.cpp's Llama graph
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'; llama.cpp's llama computes silu"),
    ("gemma2", {"query_pre_attn_scalar": 20}, "query_pre_attn_scalar 20 is neither head_dim"),
    ("gemma2", {"tie_word_embeddings": False}, "always ties the output layer to the embeddings"),
    ("llama", {"extra tensor": "model.layers.0.mlp.extra_proj.weight"}, "has no name for: model.layers.0.mlp.extra_proj"),
])
def test_models_llama_cpp_cannot_take_are_clear_errors(tiny_dirs, tmp_path, arch, change, message):
    """What llama.cpp cannot compute is refused before anything is written, with what to do instead."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_dirs(arch), base)
    config = json.loads((base / "config.json").read_text())
    tensors = load_file(str(base / "model.safetensors"))
    if "extra tensor" in change:
        tensors[change.pop("extra tensor")] = torch.zeros(4, 64)
    if change.get("tie_word_embeddings") is False:  # a head of its own, where llama.cpp's Gemma has none
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(QLoraKitError, match=message):
        export_gguf(base, peft_adapter(base, tmp_path / "a"), tmp_path / "m.gguf", **QUIET)
    assert not (tmp_path / "m.gguf").exists()


# bf16 keeps 8 significant bits, q8_0 rounds each weight to 1/127 of its block's largest and llama.cpp's
# q8_0 matmuls round the activations to 8 bits too
QUANTISED_TOLERANCE = {"bf16": 2e-2, "q8_0": 1e-1}


@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3_moe"])
def test_bf16_and_q8_0_run_in_llama_cpp(exported, tmp_path, arch, gguf_type):
    """The smaller types, stacked experts included (3-D q8_0 blocks), load and compute in llama.cpp."""
    pytest.importorskip("llama_cpp")
    base, merged, _, _ = exported(arch)
    out = tmp_path / "exported.gguf"
    report = export_gguf(base, merged.parent / f"{arch}-adapter", out, gguf_type=gguf_type, verify=False, **QUIET)
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == (Q.BF16 if gguf_type == "bf16" else Q.Q8_0)
    ids = torch.randint(4, 320, (16,), generator=torch.Generator().manual_seed(7)).tolist()
    ours, reference = llama_cpp_logits(out, ids), merged_logits(merged, ids)
    error = float(torch.linalg.vector_norm(ours - reference) / torch.linalg.vector_norm(reference))
    print(f"{arch} {gguf_type}: llama.cpp vs merged model, relative logit error {error:.2e}")
    assert error < QUANTISED_TOLERANCE[gguf_type] and report["gguf_type"] == gguf_type
