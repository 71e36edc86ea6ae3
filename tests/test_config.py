"""Run config: defaults, typo detection, type and range checks."""

import dataclasses

import pytest

from qlora_kit import LoraConfig, QLoraKitError, QuantConfig
from qlora_kit.config import RunConfig, config_from_dict, load_config


def test_defaults_are_valid_once_data_is_given():
    cfg = config_from_dict({"data": {"train": "x.jsonl"}})
    assert cfg.train.optimizer == "paged_adamw_8bit" and cfg.quant.bits == 4 and cfg.lora.r == 16


def test_unknown_key_names_nearest():
    with pytest.raises(QLoraKitError, match=r"train.learning_rate.*did you mean 'lr'|unknown config key train.lerning"):
        config_from_dict({"data": {"train": "x"}, "train": {"lerning_rate": 1e-4}})
    with pytest.raises(QLoraKitError, match="did you mean 'batch_size'"):
        config_from_dict({"data": {"train": "x"}, "train": {"batch_sise": 4}})
    with pytest.raises(QLoraKitError, match="did you mean 'lora'"):
        config_from_dict({"data": {"train": "x"}, "loras": {"r": 4}})


@pytest.mark.parametrize("section, key, value, needle", [
    ("train", "lr", -1e-4, "must be positive"),
    ("train", "batch_size", 0, "at least 1"),
    ("train", "batch_size", "four", "should be int"),
    ("train", "batch_size", 2.5, "should be int"),
    ("train", "gradient_checkpointing", "yes", "use auto .*true .*false, or a number of blocks"),
    ("train", "gradient_checkpointing", 2.5, "should be bool or int or str"),
    ("train", "memory_budget", "lots", "should be a positive size such as 12GiB"),
    ("train", "optimizer", "sgd", "use one of"),
    ("data", "max_seq_len", 0, "at least 8"),
    ("lora", "r", 0, "positive integer"),
    ("quant", "bits", 3, "bits=3"),
])
def test_bad_values(section, key, value, needle):
    raw = {"data": {"train": "x.jsonl"}}
    raw.setdefault(section, {})[key] = value
    with pytest.raises(QLoraKitError, match=needle):
        config_from_dict(raw)


def test_scientific_notation_string_and_null_quant(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "c.yaml").write_text("quant: null\ndata: {train: d.jsonl}\ntrain: {lr: 2e-4}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.lr == 2e-4 and cfg.quant.build() is None
    assert cfg.data.train == str(tmp_path / "d.jsonl")


def test_missing_train_file_key():
    with pytest.raises(QLoraKitError, match="data.train"):
        RunConfig().validate()


def test_quant_and_lora_sections_are_their_configs_fields_and_defaults():
    run = RunConfig()
    for section, target, omit in ((run.quant, QuantConfig(), ()), (run.lora, LoraConfig(), ("seed",))):
        assert dataclasses.asdict(section) == {f.name: getattr(target, f.name) for f in dataclasses.fields(target)
                                               if f.name not in omit}


def test_sections_build_their_configs_and_the_lora_seed_is_the_runs():
    cfg = config_from_dict({"data": {"train": "x.jsonl"}, "train": {"seed": 7},
                            "quant": {"bits": 8, "compute_dtype": "bf16"}, "lora": {"r": 4, "targets": ["q_proj"]}})
    assert cfg.quant.build() == QuantConfig(bits=8, compute_dtype="bf16")
    assert cfg.lora.build(cfg.train.seed) == LoraConfig(r=4, targets=["q_proj"], seed=7)
    with pytest.raises(QLoraKitError, match="unknown config key lora.seed"):
        config_from_dict({"data": {"train": "x.jsonl"}, "lora": {"seed": 1}})
