"""Freed tensor memory goes back to the system once the loader has run (glibc's mmap threshold)."""

import ctypes
import ctypes.util
import subprocess
import sys
import textwrap

import pytest

# In a fresh process: free a 16 MiB block (by default glibc then raises its mmap threshold to 16 MiB),
# then allocate a 2 MiB tensor and report whether it got its own mapping (so freeing it returns it).
SCRIPT = textwrap.dedent("""
    import ctypes, ctypes.util, sys, torch

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "loader":
        from qlora_kit.loading import load_model  # noqa: F401
        from qlora_kit.memory import return_freed_memory
        return_freed_memory()
    big = torch.ones(4 << 20)
    del big
    before = libc.mallinfo2().hblks
    block = torch.ones(1 << 19)
    print(libc.mallinfo2().hblks - before)
""")


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc >= 2.33 only")
def test_blocks_of_a_mebibyte_get_their_own_mapping():
    def mapped(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                                  check=True).stdout)

    assert mapped("default") == 0  # glibc's moving threshold: the block comes from the heap
    assert mapped("loader") == 1   # fixed at 1 MiB: its own mapping, unmapped when freed


def test_load_model_fixes_the_threshold(tiny_dir):
    import torch

    from qlora_kit import QuantConfig, load_model
    from qlora_kit import memory

    load_model(tiny_dir, quant=QuantConfig(compute_dtype=torch.float32), load_tokenizer=False, progress=False)
    assert memory._applied == (1 << 20) or not sys.platform.startswith("linux")
