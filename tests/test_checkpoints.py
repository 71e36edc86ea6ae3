"""Checkpoints: RNG states survive the trip through a checkpoint file; restoring refuses another adapter shape."""

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_kit import QLoraKitError
from qlora_kit.checkpoints import rng_state, set_rng_state
from qlora_kit.config import config_from_dict
from qlora_kit.state import load_tree, save_tree
from qlora_kit.trainer import train
from test_train import make_config


def test_rng_state_saved_and_restored_replays_the_same_draws(tmp_path):
    save_tree(rng_state(), tmp_path, "rng-0")
    first = torch.rand(4), random.random(), random.getrandbits(64)
    set_rng_state(load_tree(tmp_path, "rng-0"))
    again = torch.rand(4), random.random(), random.getrandbits(64)
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_checkpoint_from_other_lora_shape_is_refused(tmp_path, tiny_dir):
    raw = make_config(tmp_path, tiny_dir, max_steps=2)
    train(config_from_dict(raw), progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002" / "adapter"
    # Replace the checkpoint's adapter by one of rank 8 (same file layout, wrong shapes).
    tensors = load_file(ckpt / "adapter_model.safetensors")
    save_file({k: torch.zeros(8, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 8)
               for k, v in tensors.items()}, ckpt / "adapter_model.safetensors")
    raw["train"]["max_steps"] = 4
    with pytest.raises(QLoraKitError, match="another shape"):
        train(config_from_dict(raw), resume=True, progress=False)
