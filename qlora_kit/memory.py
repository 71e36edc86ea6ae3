"""Host memory: freed tensors go back to the system, without a page fault at every use.

glibc's malloc serves requests below its "mmap threshold" from a heap, and raises that threshold
(up to 32 MiB) each time a larger block is freed. Left alone, a training step's 1-32 MiB tensors
(dequantised weights, activations, gradients) all end up in the heap, which glibc rarely shrinks
and which fragments: the process keeps far more resident than the step's tensors (fp32 compute on
a 1024-wide Llama: 2368 MiB peak instead of 1144). Every block at or above the threshold gets a
mapping of its own instead, returned when freed, at the price of faulting its pages in afresh
(zeroed by the kernel) at each use, which is dear on virtual machines.

The default fixes the threshold at 4 MiB and trims the heap (`malloc_trim`) where a phase of work
ends: after loading; after each decoder block whose hidden states take 1 MiB or more, in the forward
pass if it keeps its internals for the backward pass (its freed scratch sits between the tensors it
keeps: on a 12-layer, 1024-wide Llama with no block checkpointed, 260 MiB of it by the end of the
forward pass) and in the backward pass (glibc otherwise places new tensors on trimmed pages while
freed ones stay resident: 5-7% over the plan from the third step on); before the output head's
logits; after each optimiser step and evaluation.
Tensors under 4 MiB reuse heap pages within a step; larger ones come and go with their mappings;
the peak stays the step's tensors, as qlora_kit.plan counts them. Measured with
benchmarks/vs_recipe.py (1024-wide, 12-layer Llama, 4-bit, batch 4 x 256, our side alone) on a
2-core AVX512-BF16 virtual machine, seconds a step and peak RSS:

    threshold          bf16              fp32
    1 MiB              6.51 s   984 MiB  11.76 s  1144 MiB
    4 MiB (default)    4.41 s   987 MiB  10.32 s  1149 MiB
    8 MiB              4.85 s   987 MiB   8.47 s  1828 MiB
    glibc's own        4.4 s   1218 MiB   7.91 s  2368 MiB

Measured again once the heap was trimmed after each block (paired alternating runs, the same
model, 6 steps): a 16 MiB threshold made bf16 steps 1-3% and fp32 steps about 5% faster at the same
peak with no block checkpointed, but fp32 with every block checkpointed then peaked at 1496 MiB
against 1019 (the recomputed blocks' scratch stays resident between trims), so 4 MiB stays.

QLORA_KIT_MALLOC_THRESHOLD chooses another threshold in bytes (larger: faster fp32 steps, more
resident memory); 0 leaves glibc alone (no threshold, no trim), which the plan does not count.
Nothing happens elsewhere than Linux with glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
DEFAULT_THRESHOLD = 4 << 20
_fixed: int | None = None
_libc: ctypes.CDLL | None | bool = None


def _glibc() -> ctypes.CDLL | None:
    """glibc with mallopt and malloc_trim, or None where there is no such library."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc or None


def policy() -> str | int:
    """The mmap threshold in bytes (QLORA_KIT_MALLOC_THRESHOLD, else 4 MiB), or 'glibc' for 0."""
    raw = os.environ.get("QLORA_KIT_MALLOC_THRESHOLD", "").strip()
    if not raw:
        return DEFAULT_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        from .errors import QLoraKitError
        raise QLoraKitError(f"QLORA_KIT_MALLOC_THRESHOLD={raw!r} is not a byte count: unset it (4 MiB), set a "
                            "threshold in bytes such as 8388608, or 0 for glibc's own behaviour") from None
    return "glibc" if value <= 0 else value


def configure_allocator(threshold: int | None = None) -> bool:
    """Fix glibc's mmap threshold at the policy's value (load_model calls it), or at `threshold` bytes
    whatever the environment says. Returns whether a fixed threshold is in effect."""
    global _fixed
    if threshold is None:
        chosen = policy()
        threshold = chosen if isinstance(chosen, int) else 0
    if threshold <= 0:
        return False
    if _fixed == threshold:
        return True
    libc = _glibc()
    if libc is None or libc.mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        return False
    _fixed = threshold
    return True


_HOOK = "_qlora_kit_release_hook"
# Blocks whose hidden states are smaller keep sub-MiB tensors, whose freed pages glibc reuses well
# enough: a trim per block would cost more in page faults than it returns (SmolLM2, 384 tokens,
# 30 blocks: steps about 9% slower, 65 MiB less).
PER_BLOCK_MIN_BYTES = 1 << 20


def release_after_block(module, forward: bool = True, backward: bool = True) -> None:
    """Call `release_freed_memory` on the CPU while autograd records: with forward, each time module's
    forward pass ends (a decoder block that keeps its internals for the backward pass: its freed
    scratch lies between them); with backward, when the backward pass reaches module's output (the
    block after it has freed what it kept or recomputed). Both False removes the hook."""
    handle = module.__dict__.pop(_HOOK, None)
    if handle is not None:
        handle.remove()
    if forward or backward:
        hook = functools.partial(_release_after_block, forward=forward, backward=backward)
        module.__dict__[_HOOK] = module.register_forward_hook(hook)


def _release_after_block(module, args, output, forward: bool, backward: bool) -> None:
    first = output[0] if isinstance(output, (tuple, list)) else output
    if (isinstance(first, torch.Tensor) and first.device.type == "cpu" and torch.is_grad_enabled()
            and first.numel() * first.element_size() >= PER_BLOCK_MIN_BYTES):
        if forward:
            release_freed_memory()
        if backward and first.requires_grad:
            first.register_hook(_release_in_backward)
    return None  # a forward hook's non-None result would replace the block's output


def _release_in_backward(grad) -> None:
    release_freed_memory()
    return None  # the gradient passes unchanged


def release_freed_memory(device=None) -> bool:
    """Give the heap's free pages back to the system (malloc_trim); a phase of work has ended. Returns
    whether anything was released; a no-op under QLORA_KIT_MALLOC_THRESHOLD=0, without glibc, and for
    work on a `device` other than the CPU (a GPU's tensors live in torch's caching allocator)."""
    if getattr(device, "type", device) not in (None, "cpu") or policy() == "glibc":
        return False
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
