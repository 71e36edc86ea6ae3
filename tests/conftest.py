import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tiny import make_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny random model folder per architecture, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch: str = "llama", **shape) -> Path:
        key = (arch, tuple(sorted(shape.items())))
        if key not in cache:
            cache[key] = make_model_dir(root / f"{arch}-{len(cache)}", arch, **shape)
        return cache[key]

    return get


@pytest.fixture
def tiny_dir(tiny_dirs):
    return tiny_dirs("llama")


@pytest.fixture(scope="session")
def smollm2_dir():
    from qlora_kit import smollm2_path

    return smollm2_path()
