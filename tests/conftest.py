import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Child processes (CLI, torchrun) resolve compute_dtype 'auto' as on a CPU without fast bf16, whatever
# CPU runs the suite; in this process 'auto' is refused unless a test fakes the probe (below).
os.environ["QLORA_KIT_CPU_BF16"] = "0"
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import qlora_kit.dtypes  # noqa: E402
from tiny import make_model_dir  # noqa: E402

REAL_PROBE = qlora_kit.dtypes.cpu_has_fast_bf16  # for the test of the probe itself

# The compute dtypes of the core matrix. fp16 runs on CPU too (slowly, fine for tiny models).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _dtype_is_named(request, monkeypatch):
    """A test must name its compute dtype: an 'auto' that reaches the CPU probe fails the test, so the
    suite means the same on AVX2-only and AVX512-BF16 machines. Tests about 'auto' itself use
    `fake_cpu`, which answers the probe."""
    if "fake_cpu" in request.fixturenames:
        return

    def refuse() -> bool:
        raise AssertionError("this test resolved compute_dtype 'auto' on the real CPU, so it would mean different "
                             "things on different machines: pass an explicit compute dtype, or use fake_cpu")

    monkeypatch.setattr("qlora_kit.dtypes.cpu_has_fast_bf16", refuse)


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(bf16=True) makes the CPU probe say this CPU has (or lacks) fast bf16."""
    def set_cpu(bf16: bool) -> None:
        monkeypatch.setattr("qlora_kit.dtypes.cpu_has_fast_bf16", lambda: bf16)

    return set_cpu


@pytest.fixture(params=["fp32", "bf16"])
def dtype(request) -> torch.dtype:
    """The compute dtype of a core-matrix test: fp32 and bf16 on every machine."""
    return DTYPES[request.param]


@pytest.fixture(params=["fp32", "bf16", "fp16"])
def any_dtype(request) -> torch.dtype:
    """fp32, bf16 and fp16: for tests whose ops all exist in fp16 on CPU."""
    return DTYPES[request.param]


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
