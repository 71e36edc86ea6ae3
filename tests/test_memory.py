"""Host memory policy (qlora_kit.memory): freed tensors are reused within a step and returned between steps."""

import ctypes
import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qlora_kit import QLoraKitError

# In a fresh process: free a 16 MiB block (by default glibc then raises its mmap threshold to 16 MiB),
# then allocate a tensor of argv[2] MiB and report whether it got its own mapping (so freeing it returns it).
MAPPED = textwrap.dedent("""
    import ctypes, ctypes.util, sys, torch

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "loader":
        from qlora_kit.memory import configure_allocator
        configure_allocator()  # what load_model does first
    big = torch.ones(4 << 20)
    del big
    before = libc.mallinfo2().hblks
    block = torch.ones(int(sys.argv[2]) << 18)
    print(libc.mallinfo2().hblks - before)
""")

# In a fresh process: a step's worth of 2 MiB tensors from the heap, all freed but the last one
# (which pins the heap's top, so glibc cannot shrink it by itself); then the resident set before and
# after release_freed_memory, in KiB.
RELEASED = textwrap.dedent("""
    import re, torch
    from pathlib import Path
    from qlora_kit.memory import configure_allocator, release_freed_memory

    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))

    configure_allocator()
    warm = torch.ones(4 << 20)  # glibc's own behaviour: raise its threshold past 2 MiB, as a first step does
    del warm
    blocks = [torch.ones(1 << 19) for _ in range(64)]  # 128 MiB
    pin = torch.ones(1 << 19)
    del blocks
    before = rss()
    released = release_freed_memory()
    print(before, rss(), int(released))
""")


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")
    except OSError:
        return False


glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc >= 2.33 only")


def _run(script: str, *args: str, threshold: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "QLORA_KIT_MALLOC_THRESHOLD"}
    if threshold is not None:
        env["QLORA_KIT_MALLOC_THRESHOLD"] = threshold
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
                          env=env).stdout


@glibc_only
def test_blocks_from_four_mebibytes_get_their_own_mapping():
    assert int(_run(MAPPED, "default", "8")) == 0     # glibc's moving threshold: from the heap, kept when freed
    assert int(_run(MAPPED, "loader", "8")) == 1      # qlora_kit's 4 MiB: its own mapping, unmapped when freed
    assert int(_run(MAPPED, "loader", "2")) == 0      # smaller: from the heap, reused, trimmed between steps
    assert int(_run(MAPPED, "loader", "2", threshold="1048576")) == 1  # a threshold of the user's
    assert int(_run(MAPPED, "loader", "8", threshold="0")) == 0        # glibc's own behaviour


@glibc_only
def test_release_gives_a_steps_freed_heap_back():
    before, after, released = map(int, _run(RELEASED).split())
    assert released == 1 and before - after > 100 * 1024  # of 128 MiB freed, over 100 MiB leave the resident set
    before, after, released = map(int, _run(RELEASED, threshold="0").split())
    assert released == 0 and before - after < 16 * 1024   # glibc's own behaviour: kept


def test_a_threshold_that_is_not_a_number_is_refused(monkeypatch):
    from qlora_kit.memory import DEFAULT_THRESHOLD, policy

    monkeypatch.setenv("QLORA_KIT_MALLOC_THRESHOLD", "1MiB")
    with pytest.raises(QLoraKitError, match="not a byte count"):
        policy()
    monkeypatch.setenv("QLORA_KIT_MALLOC_THRESHOLD", "0")
    assert policy() == "glibc"
    monkeypatch.setenv("QLORA_KIT_MALLOC_THRESHOLD", "8388608")
    assert policy() == 8 << 20
    monkeypatch.delenv("QLORA_KIT_MALLOC_THRESHOLD")
    assert policy() == DEFAULT_THRESHOLD == 4 << 20


def test_load_and_every_training_step_release_freed_memory(tmp_path, tiny_dir, monkeypatch):
    """The loader trims after its last tensor, the trainer after each optimiser step and evaluation."""
    from qlora_kit import loading, trainer

    from test_train import make_config

    calls = []
    monkeypatch.setattr(loading, "release_freed_memory", lambda: calls.append("load"))
    monkeypatch.setattr(trainer, "release_freed_memory", lambda device=None: calls.append("train"))
    raw = make_config(tmp_path, tiny_dir, compute_dtype="fp32", max_steps=4, eval_every=2, save_every=4)
    trainer.train(raw, progress=False)
    assert calls.count("load") >= 1
    assert calls.count("train") >= 4 + 2  # four steps, and the evaluations (before, at step 2 and 4)


def test_blocks_release_their_scratch_in_both_passes(tiny_dirs, monkeypatch):
    """A block that keeps its internals for the backward pass trims the heap once its forward pass
    ends (its freed scratch lies between the tensors it keeps); every block trims it when the
    backward pass reaches its output. Nothing without autograd recording, nor for blocks whose
    hidden states are under memory.PER_BLOCK_MIN_BYTES. Outputs and gradients are untouched."""
    from qlora_kit import LoraConfig, QuantConfig, add_lora, load_model, set_gradient_checkpointing
    from qlora_kit import memory

    model, _ = load_model(tiny_dirs("llama", layers=3), quant=QuantConfig(compute_dtype="fp32"), progress=False)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    model.train()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(memory, "PER_BLOCK_MIN_BYTES", 2 * 16 * 64 * 4)  # this model's hidden states, fp32
    params = [p for p in model.parameters() if p.requires_grad]

    def forward():
        calls.clear()
        return model(input_ids=ids, use_cache=False).logits

    reference = None
    for blocks, unchecked in ((1, 2), (False, 3), (True, 0), (3, 0), (0, 3)):
        set_gradient_checkpointing(model, blocks)
        out = forward()
        assert len(calls) == unchecked, blocks
        grads = torch.autograd.grad(out.square().mean(), params)
        assert len(calls) == unchecked + 3, blocks
        reference = reference or (out.detach(), grads)
        torch.testing.assert_close(out, reference[0], rtol=0, atol=0)
        for g, r in zip(grads, reference[1]):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)
        with torch.no_grad():
            assert torch.equal(forward(), out)
        assert not calls
    monkeypatch.setattr(memory, "PER_BLOCK_MIN_BYTES", 2 * 16 * 64 * 4 + 1)
    set_gradient_checkpointing(model, False)
    torch.autograd.grad(forward().square().mean(), params)
    assert not calls


def test_release_is_for_the_host_heap_only(monkeypatch):
    """Work on a GPU leaves the host heap alone: its tensors live in torch's caching allocator."""
    from qlora_kit import memory

    trims = []

    class FakeLibc:
        def malloc_trim(self, pad):
            trims.append(pad)
            return 1

    monkeypatch.delenv("QLORA_KIT_MALLOC_THRESHOLD", raising=False)
    monkeypatch.setattr(memory, "_glibc", lambda: FakeLibc())
    assert not memory.release_freed_memory("cuda") and not memory.release_freed_memory(torch.device("cuda", 0))
    assert trims == []
    assert memory.release_freed_memory(torch.device("cpu")) and memory.release_freed_memory()
    assert trims == [0, 0]
