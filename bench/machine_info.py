"""The CPU a benchmark ran on: model name and the instruction-set flags the engine's paths depend on.

Every result records these (issue 16): a figure means little without the ISA it ran on.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

# The flags that decide which kernels can run: AVX2/FMA/F16C (the baseline), every AVX-512 and
# AMX extension, and the AVX-VNNI variants without AVX-512.
RELEVANT = re.compile(r"^(avx2|fma|f16c|avx512.*|amx.*|avx_vnni.*|avx_ne_convert|avx_ifma)$")


def _cpuinfo_field(name: str) -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def cpu_flags() -> list[str]:
    """The relevant ISA flags of this CPU, sorted (empty where /proc/cpuinfo is missing)."""
    return sorted(f for f in _cpuinfo_field("flags").split() if RELEVANT.match(f))


def cpu_summary() -> dict[str, Any]:
    return {
        "cpu": _cpuinfo_field("model name") or platform.processor(),
        "cpu_flags": cpu_flags(),
        "nproc": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
    }
