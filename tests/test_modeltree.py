"""modeltree: linear layers, module replacement, decoder blocks, and the one target rule that add_lora
and the planner share."""

import pytest
import torch
from torch import nn

from qlora_kit import LoraConfig, QLoraKitError, QuantConfig, add_lora, load_model, lora_layers
from qlora_kit.modeltree import decoder_layers, linear_layer_names, select_targets, set_module
from qlora_kit.plan import resolve_shape, target_layers

FP32 = QuantConfig(compute_dtype=torch.float32)
NAMES = [f"model.layers.{i}.{p}" for i in range(2)
         for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")]


@pytest.mark.parametrize("targets, expected", [
    ("all-linear", NAMES),
    (["q_proj", "up_proj"], [n for n in NAMES if n.endswith(("q_proj", "up_proj"))]),
    (["self_attn.k_proj"], [n for n in NAMES if n.endswith("self_attn.k_proj")]),
    (r"model\.layers\.1\..*", NAMES[4:]),
])
def test_select_targets(targets, expected):
    assert select_targets(NAMES, targets) == expected


@pytest.mark.parametrize("targets, needle", [
    (["q_proj", "qkv"], r"\['qkv'\] match no linear layer"),  # a typo beside a good name is not ignored
    (["q_prj"], r"did you mean 'q_proj'"),
    (r"transformer\.h\..*", r"match no linear layer of this model; its linear layers end in: k_proj, q_proj"),
])
def test_select_targets_errors_name_what_exists(targets, needle):
    with pytest.raises(QLoraKitError, match=needle):
        select_targets(NAMES, targets)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "down_proj"], r".*\.mlp\..*", ["qkv"]])
def test_add_lora_and_the_planner_choose_the_same_layers(tiny_dir, targets):
    """One rule: the layers the planner counts are the layers add_lora wraps (or both refuse alike)."""
    model, _ = load_model(tiny_dir, quant=FP32, load_tokenizer=False, progress=False)
    shape = resolve_shape(str(tiny_dir))
    try:
        planned = [name for name, *_ in target_layers(shape, targets)]
    except QLoraKitError as e:
        with pytest.raises(QLoraKitError) as again:
            add_lora(model, LoraConfig(r=2, targets=targets))
        assert str(again.value) == str(e)
        return
    add_lora(model, LoraConfig(r=2, targets=targets))
    assert sorted(planned) == sorted(lora_layers(model))


def test_linear_layers_exclude_the_head_and_the_adapters(tiny_dir):
    model, _ = load_model(tiny_dir, quant=FP32, load_tokenizer=False, progress=False)
    before = linear_layer_names(model)
    assert before and "lm_head" not in before
    add_lora(model, LoraConfig(r=2, targets=["q_proj"]))
    after = linear_layer_names(model)
    assert not any(n.endswith(("lora_A", "lora_B")) for n in after)
    assert len(after) == len(before)  # q_proj is now found as q_proj.base_layer


def test_set_module_and_decoder_layers(tiny_dir):
    model, _ = load_model(tiny_dir, quant=FP32, load_tokenizer=False, progress=False)
    blocks = decoder_layers(model)
    assert blocks and blocks[0] is model.model.layers[0]
    new = nn.Identity()
    set_module(model, "model.layers.0.mlp", new)
    assert model.model.layers[0].mlp is new
    with pytest.raises(QLoraKitError, match="no decoder layers"):
        decoder_layers(nn.Linear(2, 2))
