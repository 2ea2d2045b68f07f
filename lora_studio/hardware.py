"""What this machine can do fast: the CPU model, native bf16 support, threads, the GPU.

Training speed on a CPU depends on whether it has native bf16 (AVX-512 BF16 or AMX): with it, bf16
matmuls run several times faster than fp32; without it (most AVX2 machines) bf16 is emulated and
~10x slower. So this is detected, never assumed, and `lora-studio bench` confirms it by measuring.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .threads import available_cores

_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo names of native bf16 instructions


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX), as torch's check or the flags say."""
    is_supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if is_supported is not None and is_supported():
        return True
    return bool(cpu_flags() & _BF16_FLAGS)


def describe() -> dict[str, Any]:
    """The machine, for benchmark reports: CPU model, bf16 support, threads, GPU."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "amx": "amx_bf16" in cpu_flags(),
        "cpu_count": os.cpu_count(),
        "available_cores": available_cores(),  # affinity and cgroup quota: what this process may use
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    except OSError:
        pass
    return info
