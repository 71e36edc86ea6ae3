"""Dtype names and the dtype a device computes fast in: the leaf every other module builds on.

`compute_dtype: auto` means bf16 where the hardware multiplies it natively (Ampere+ GPUs, CPUs
with AVX512-BF16 or AMX), fp16 on older GPUs, fp32 on other CPUs; `QLORA_KIT_CPU_BF16=0|1`
overrides the CPU probe so either path can be run or measured on any machine.
"""

from __future__ import annotations

import os

import torch

from .errors import QLoraKitError

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def as_dtype(value: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """Accept a torch dtype or one of its usual names ('bf16', 'float32', ...)."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise QLoraKitError(f"unknown {what} {value!r}: use one of bf16, fp16, fp32")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The 16-bit dtype this device multiplies quickly, else fp32.

    bf16 on GPUs that support it (Ampere and newer) and on CPUs with AVX512-BF16 or AMX; fp16 on
    older GPUs (T4, V100); fp32 on other CPUs, where a bf16 GEMM is emulated and runs >100x slower
    than fp32 (measured: 0.8 vs 118 GFLOP/s on a 2-core AVX2 EPYC)."""
    device = torch.device(device)
    if device.type == "cuda":
        # not is_bf16_supported(): it also says yes where bf16 is only emulated (T4, V100)
        fast = torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if fast else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively; QLORA_KIT_CPU_BF16=1 or 0 overrides the probe (to run
    or measure the other dtype path on any machine)."""
    forced = os.environ.get("QLORA_KIT_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(value: torch.dtype | str, device: str | torch.device = "cpu", what: str = "dtype") -> torch.dtype:
    """as_dtype, with 'auto' meaning fast_dtype(device)."""
    return fast_dtype(device) if value == "auto" else as_dtype(value, what)
