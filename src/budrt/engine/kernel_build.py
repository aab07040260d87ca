"""Compiling and loading the CPU kernels of engine/csrc (one extension) with torch's JIT loader.

One build per kernel ISA level (engine/cpu_features.py: "avx2", "avx512"), compiled with that level's
explicit flags. Builds go into `$TORCH_EXTENSIONS_DIR` or `~/.cache/budrt/torch_extensions`, keyed
by the sources, compiler flags, torch and Python, so later processes load the cached library.
engine/kernels.py decides which level and when to build, and wraps the functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from budrt.observe.progress import NO_PROGRESS, ProgressReporter

log = logging.getLogger(__name__)

# One translation unit, in this order: each file calls functions of the files before it.
SOURCES = [
    Path(__file__).with_name("csrc") / name
    for name in (
        "attention_loops.cpp",
        "paged_attention.cpp",
        "rms_norm.cpp",
        "silu_mul.cpp",
        "argmax.cpp",
        "token_masks.cpp",
        "q8_linear.cpp",
        "q4_linear.cpp",
        "rope_cache.cpp",
        "decode_stack.cpp",
        "quantize_rows.cpp",
    )
]
FUNCTIONS = [
    "paged_decode_attention",
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "argmax_rows",
    "apply_token_masks",
    "q8_linear",
    "q4_tiles_supported",
    "q4_tiles_linear",
    "rope_cache_decode_attention",
    "rope_cache_write",
    "decode_layers",
    "onednn_rows",
    "quantize_rows",
]
ENV_SWITCH = "BUDRT_ENGINE_KERNELS"  # "auto" (default) or "torch"
_NAME = "budrt_cpu_kernels"  # + "_<level>": the extension's module name, also in its cache key
# Explicit per-level flags, not -march=native: a build is then valid on any CPU of its level, and
# the ISA a build uses is the one named, whatever machine compiled it. CPU_CAPABILITY sizes ATen's
# Vectorized<float> (the headers the kernels use) to the level's vector width.
_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16"]
LEVEL_FLAGS = {
    "avx2": _AVX2,
    "avx512": [*_AVX2[:3], *_AVX512, "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "auto").strip().lower() != "torch"


def cache_directory() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path.home() / ".cache" / "budrt" / "torch_extensions"
    )
    return Path(root) / "budrt"


def ensure_ninja_on_path() -> None:
    # The `ninja` wheel puts its binary next to the interpreter's scripts, which is not on PATH
    # when the venv's python is run without activating the venv.
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # type: ignore[import-not-found]

        candidates.insert(0, Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for folder in candidates:
        if (folder / "ninja").exists():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def module_name(level: str) -> str:
    return f"{_NAME}_{level}"


def compile_flags(level: str) -> list[str]:
    # -fopenmp: at::parallel_for is a header over `#pragma omp parallel` (else a serial loop).
    return ["-O3", "-fopenmp", *LEVEL_FLAGS[level]]


def library_path(level: str) -> Path:
    """Where the build of `level` for these sources, flags, torch and Python is kept."""
    sources = [source.read_text() for source in SOURCES]
    key = "\0".join([*sources, *compile_flags(level), torch.__version__, sys.version, module_name(level)])
    return cache_directory() / f"{module_name(level)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _load_library(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _remove_stale_builds(folder: Path) -> None:
    # Build directories of processes killed mid-build (a day is longer than any build).
    cutoff = time.time() - 86400
    for stale in folder.glob("build-*"):
        try:
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _main_source() -> str:
    """The translation unit: the sources in order, then the Python bindings (what load_inline
    writes; errors in a kernel become Python exceptions through wrap_pybind_function)."""
    bindings = [f'm.def("{f}", torch::wrap_pybind_function({f}), "{f}");' for f in FUNCTIONS]
    parts = ["#include <torch/extension.h>", *(source.read_text() for source in SOURCES)]
    return "\n".join([*parts, "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {", *bindings, "}"])


def build(level: str) -> Path:
    """Compile `level` into the cache (if not there yet) without loading it: the machine that
    builds may lack the level's instructions. Build in a fresh directory and rename the library
    into place, so processes that build at once never share torch's lock file (one killed
    mid-build would leave that lock behind, and every later process would wait on it for ever).
    Raises if the compiler fails."""
    # torch's JIT builder without its import step (load_inline always loads); torch is pinned.
    from torch.utils.cpp_extension import _write_ninja_file_and_build_library

    library = library_path(level)
    if library.exists():
        return library
    ensure_ninja_on_path()
    folder = library.parent
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(folder)
    name = module_name(level)
    workdir = Path(tempfile.mkdtemp(prefix=f"build-{library.stem.rsplit('-', 1)[-1]}-", dir=folder))
    try:
        (workdir / "main.cpp").write_text(_main_source())
        _write_ninja_file_and_build_library(
            name=name,
            sources=[str(workdir / "main.cpp")],
            extra_cflags=compile_flags(level),
            extra_cuda_cflags=[],
            extra_sycl_cflags=[],
            # Resolves to the libgomp torch has already loaded (same soname): one thread pool.
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[],
            build_directory=str(workdir),
            verbose=False,
            with_cuda=False,
            with_sycl=False,
        )
        staged = folder / f".{library.name}.{os.getpid()}"
        shutil.copyfile(workdir / f"{name}.so", staged)
        os.replace(staged, library)  # atomic: others see no library or a whole one
        return library
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def load(level: str, compile_missing: bool, progress: ProgressReporter = NO_PROGRESS) -> ModuleType | None:
    """The cached library of `level` (which this CPU must run); compiled first (blocking) if
    missing and `compile_missing`, else None. Raises if the build fails. `progress` hears of a
    build (phase "compile", 0 then 1 of 1: one compiler run, no steps to count)."""
    library = library_path(level)
    if not library.exists():
        if not compile_missing:
            return None
        log.info("compiling the CPU kernels for %s (once per machine, about a minute)", level)
        started = time.monotonic()
        progress.report("compile", 0, 1)
        build(level)
        progress.report("compile", 1, 1)
        log.info("compiled the CPU kernels for %s in %.0f s", level, time.monotonic() - started)
    return _load_library(module_name(level), library)
