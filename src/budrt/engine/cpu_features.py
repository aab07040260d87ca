"""What this CPU can do: its vector-instruction flags, the kernel ISA level they allow, and
whether bf16 dot products run in hardware.

Kernel levels, lowest first (engine/kernel_build.py compiles one extension per level):
- "avx2": AVX2 + FMA + F16C, what most laptops and cloud VMs have;
- "avx512": that plus AVX-512 F/BW/VL/DQ, AVX512-VNNI and AVX512-BF16.

`BUDRT_CPU_ISA` (avx2 | avx512 | auto, default auto) forces a level at most as high as the CPU's,
e.g. so a CI machine with AVX-512 also runs the AVX2 kernels and fp32 activations; asking for more
than the CPU has is an error. It is read from the environment (like `BUDRT_ENGINE_KERNELS`), not
from the settings tree: `python -m budrt.engine.kernels` and the tests run without settings.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from dataclasses import dataclass

import torch

ENV_ISA = "BUDRT_CPU_ISA"
LEVELS = ("avx2", "avx512")  # lowest first
_AVX512_EXTRA = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")
NEEDS = {"avx2": ("avx2", "fma", "f16c"), "avx512": ("avx2", "fma", "f16c", *_AVX512_EXTRA)}


@dataclass(frozen=True)
class CPUFeatures:
    """The flags of interest, named as Linux's /proc/cpuinfo names them."""

    model: str = ""
    avx2: bool = False
    fma: bool = False
    f16c: bool = False
    avx512f: bool = False
    avx512bw: bool = False
    avx512vl: bool = False
    avx512dq: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False
    avx512_bf16: bool = False
    amx_tile: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False

    @classmethod
    def from_flags(cls, model: str, flags: set[str]) -> CPUFeatures:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "model"]
        return cls(model, **{name: name in flags for name in names})

    def flags(self) -> list[str]:
        """The flags of interest this CPU has."""
        return [f.name for f in dataclasses.fields(self) if f.name != "model" and getattr(self, f.name)]

    def missing(self, level: str) -> list[str]:
        """The flags `level` needs that this CPU lacks."""
        return [flag for flag in NEEDS[level] if not getattr(self, flag)]

    def best_level(self) -> str | None:
        """The highest kernel level this CPU runs, or None (then the engine takes torch's paths)."""
        runnable = [level for level in LEVELS if not self.missing(level)]
        return runnable[-1] if runnable else None


def parse_cpuinfo(text: str) -> CPUFeatures | None:
    """The features in a Linux /proc/cpuinfo text (its first processor), or None if it has no
    "flags" line (not x86)."""
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    return None if flags is None else CPUFeatures.from_flags(model, flags)


# torch's own dispatch level, where there is no /proc/cpuinfo: it implies these flags and no more.
_TORCH_CAPABILITY_FLAGS = {
    "AVX2": {"avx2", "fma", "f16c"},
    "AVX512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
}


@functools.cache
def detect() -> CPUFeatures:
    """This machine's features (read once per process)."""
    try:
        with open("/proc/cpuinfo") as f:
            parsed = parse_cpuinfo(f.read())
    except OSError:
        parsed = None
    if parsed is not None:
        return parsed
    capability = torch.backends.cpu.get_cpu_capability()
    model = platform.processor() or platform.machine()
    return CPUFeatures.from_flags(model, _TORCH_CAPABILITY_FLAGS.get(capability, set()))


def forced_level() -> str | None:
    """The level `BUDRT_CPU_ISA` asks for; None for "auto" or unset. Raises on another value."""
    value = os.environ.get(ENV_ISA, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in LEVELS:
        raise ValueError(f"{ENV_ISA}={value!r}: expected one of {', '.join(LEVELS)} or auto")
    return value


def choose_level(features: CPUFeatures, forced: str | None) -> tuple[str | None, str]:
    """The kernel level to use and why: the best the CPU runs, or `forced` if the CPU runs it.
    Raises ValueError naming what the CPU has when `forced` is above it."""
    best = features.best_level()
    if forced is None:
        if best is None:
            return None, f"unavailable: the CPU lacks {', '.join(features.missing('avx2'))}"
        return best, "detected: the best level this CPU runs"
    lacking = features.missing(forced)
    if lacking:
        raise ValueError(
            f"{ENV_ISA}={forced}: this CPU ({features.model or 'unknown'}) lacks {', '.join(lacking)}; "
            f"it has {', '.join(features.flags()) or 'none of the flags of interest'}, "
            f"so at most {best or 'no kernel level'} (or set {ENV_ISA}=auto)"
        )
    return forced, f"forced by {ENV_ISA}={forced} (the CPU runs {best})"


def kernel_level() -> tuple[str | None, str]:
    """This process's kernel level (`choose_level` for this CPU and `BUDRT_CPU_ISA`) and why."""
    return choose_level(detect(), forced_level())


def bf16_rule(features: CPUFeatures, level: str | None) -> tuple[bool, str]:
    """Whether activations should be bf16: bf16 dot products in hardware and the avx512 level
    (forcing avx2 means fp32 activations too); and why."""
    hardware = [flag for flag in ("avx512_bf16", "amx_bf16") if getattr(features, flag)]
    if not hardware:
        return False, "fp32: no bf16 dot products in hardware (avx512_bf16/amx_bf16), bf16 would be emulated"
    if level != "avx512":
        return False, f"fp32: the CPU has {', '.join(hardware)} but the kernel level is {level}"
    return True, f"bf16: dot products in hardware ({', '.join(hardware)})"


def native_bf16() -> tuple[bool, str]:
    """`bf16_rule` for this CPU at this process's kernel level."""
    level, _ = kernel_level()
    return bf16_rule(detect(), level)
