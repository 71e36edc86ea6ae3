"""How a model becomes a shape: presets against transformers' parameter counts and the published
sizes, a folder, its config.json and its dict planning alike, the packaged demo model by name, and
clear errors for an unknown preset or a config that lacks what the plan needs."""

import json

import pytest
import torch

from qlora_kit import QLoraKitError, QuantConfig, plan_memory
from qlora_kit.shapes import PRESETS, resolve_shape

SHAPE = dict(hidden=128, intermediate=176, heads=4, kv_heads=2)
BF16 = QuantConfig(compute_dtype=torch.bfloat16)


def test_preset_parameter_counts_match_transformers():
    """Each preset's projections and norms, built by transformers (one layer, on meta), count the same."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, cfg in PRESETS.items():
        cfg = {**cfg, "num_hidden_layers": 1}
        config = AutoConfig.for_model(**cfg)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()
        expected = sum(p.numel() for p in model.parameters())
        assert resolve_shape(cfg).parameters() == expected, name


@pytest.mark.parametrize("preset,billions", [("llama-2-7b", 6.74), ("llama-2-13b", 13.0), ("llama-2-70b", 69.0),
                                             ("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.6), ("mistral-7b", 7.25),
                                             ("qwen2.5-7b", 7.62), ("qwen2.5-72b", 72.7), ("gemma-2-9b", 9.24),
                                             ("gemma-2-2b", 2.61), ("llama-65b", 65.3), ("gemma-3-27b", 27.0)])
def test_presets_have_their_published_sizes(preset, billions):
    assert resolve_shape(preset).parameters() / 1e9 == pytest.approx(billions, rel=0.02)


def test_plan_from_folder_dict_and_model_agree(tiny_dirs):
    folder = tiny_dirs("llama", **SHAPE)
    a = plan_memory(folder, BF16)
    b = plan_memory(folder / "config.json", BF16)
    c = plan_memory(json.loads((folder / "config.json").read_text()), BF16)
    assert a.components == b.components == c.components


def test_plan_reads_the_packaged_demo_model_by_name(smollm2_dir):
    plan = plan_memory("smollm2", BF16, device="cpu")
    assert plan.model == smollm2_dir.name and 134_000_000 < plan.parameters < 135_000_000


def test_unknown_preset_lists_presets_and_suggests_the_closest():
    with pytest.raises(QLoraKitError, match="did you mean 'llama-3.1-8b'") as e:
        plan_memory("llama-3.1-8bb")
    assert "qwen2.5-72b" in str(e.value) and "gemma-2-9b" in str(e.value)


def test_config_missing_fields_names_them(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 10}))
    with pytest.raises(QLoraKitError, match="intermediate_size, num_hidden_layers, num_attention_heads"):
        plan_memory(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(QLoraKitError, match="not valid JSON"):
        plan_memory(tmp_path)
