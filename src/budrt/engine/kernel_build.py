"""Compiling and loading the CPU kernels of engine/csrc (one extension) with torch's JIT loader.

The build goes into `$TORCH_EXTENSIONS_DIR` or `~/.cache/budrt/torch_extensions`, keyed by the
sources, compiler flags, torch, Python and CPU, so later processes load the cached library.
engine/kernels.py decides when to build and wraps the functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

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
        "q8_linear.cpp",
        "q4_linear.cpp",
        "rope_cache.cpp",
        "decode_stack.cpp",
    )
]
FUNCTIONS = [
    "paged_decode_attention",
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "argmax_rows",
    "q8_linear",
    "q4_tiles_supported",
    "q4_tiles_linear",
    "rope_cache_decode_attention",
    "rope_cache_write",
    "decode_layers",
]
ENV_SWITCH = "BUDRT_ENGINE_KERNELS"  # "auto" (default) or "torch"
_NAME = "budrt_cpu_kernels"  # the extension's module name, also in its cache key


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "auto").strip().lower() != "torch"


def cache_directory() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path.home() / ".cache" / "budrt" / "torch_extensions"
    )
    return Path(root) / "budrt"


def _vector_flags() -> list[str]:
    """Make ATen's Vectorized<float> as wide as the vector code torch itself dispatches to here."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX512", "AVX2"):
        return ["-march=native", f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    return ["-march=native", "-DCPU_CAPABILITY=DEFAULT"]


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


def _cpu_model() -> str:
    # -march=native code must not be reused on another CPU sharing this home directory.
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def _load_library(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _library_path() -> Path:
    """Where the build for this source, compiler flags, torch, Python and CPU is kept."""
    sources = [source.read_text() for source in SOURCES]
    key = "\0".join([*sources, *compile_flags(), torch.__version__, sys.version, _NAME, _cpu_model()])
    return cache_directory() / f"{_NAME}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def compile_flags() -> list[str]:
    # -fopenmp: at::parallel_for is a header over `#pragma omp parallel` (else a serial loop).
    return ["-O3", "-fopenmp", *_vector_flags()]


def _remove_stale_builds(folder: Path) -> None:
    # Build directories of processes killed mid-build (a day is longer than any build).
    cutoff = time.time() - 86400
    for stale in folder.glob("build-*"):
        try:
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _compile(library: Path) -> ModuleType:
    """Build in a fresh directory and rename the library into place. Processes that build at once
    then never share torch's lock file: one killed mid-build would leave that lock behind, and
    every later process would wait on it for ever."""
    from torch.utils.cpp_extension import load_inline

    ensure_ninja_on_path()
    folder = library.parent
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(folder)
    workdir = Path(tempfile.mkdtemp(prefix=f"build-{library.stem.rsplit('-', 1)[-1]}-", dir=folder))
    try:
        module = load_inline(
            name=_NAME,
            cpp_sources=[source.read_text() for source in SOURCES],
            functions=FUNCTIONS,
            extra_cflags=compile_flags(),
            # Resolves to the libgomp torch has already loaded (same soname): one thread pool.
            extra_ldflags=["-fopenmp"],
            build_directory=str(workdir),
            verbose=False,
        )
        staged = folder / f".{library.name}.{os.getpid()}"
        shutil.copyfile(workdir / f"{_NAME}.so", staged)
        os.replace(staged, library)  # atomic: others see no library or a whole one
        return module
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def load(compile_missing: bool) -> ModuleType | None:
    """The cached library for this machine; compiled first (blocking) if missing and
    `compile_missing`, else None. Raises if the build fails."""
    library = _library_path()
    if library.exists():
        return _load_library(library)
    if compile_missing:
        log.info("compiling the CPU kernels (once per machine, about a minute)")
        return _compile(library)
    return None
