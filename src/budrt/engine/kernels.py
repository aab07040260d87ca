"""Optional C++ kernels for the CPU engine, compiled on this machine once (csrc/, one extension).

- paged_attention.cpp: decode attention straight from the paged cache through the block tables;
- rms_norm.cpp: bf16 RMSNorm with the residual add fused in (about twelve small ops per norm);
- rope_cache.cpp: a decode-only step's RoPE, cache write and attention in one call per layer;
- decode_stack.cpp: all layers of a small 4-bit decode step in one call (decode_stack.py).
Built with torch's JIT extension loader (a C++ compiler and ninja, no network) into
`$TORCH_EXTENSIONS_DIR` or `~/.cache/budrt/torch_extensions`; later processes load the cached
build. `make` builds it (`python -m budrt.engine.kernels`), else the first `prepare()` does (about
a minute). A model server calls it before it reports ready, never mid-serving: switching paths
mid-run would change bf16 outputs (and so seeded sampling) between requests. If the build fails
(one warning) the engine takes the torch paths for good; `BUDRT_ENGINE_KERNELS=torch` forces them.
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
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

# One translation unit, in this order: each file calls functions of the files before it.
SOURCES = [
    Path(__file__).with_name("csrc") / name
    for name in ("paged_attention.cpp", "rms_norm.cpp", "rope_cache.cpp", "decode_stack.cpp")
]
FUNCTIONS = [
    "paged_decode_attention",
    "rms_norm",
    "add_rms_norm",
    "rope_cache_decode_attention",
    "q4_decode_layers",
]
ENV_SWITCH = "BUDRT_ENGINE_KERNELS"  # "auto" (default) or "torch"
_NAME = "budrt_paged_attention"

_lock = threading.Lock()  # one build per process, however many threads ask
_module: ModuleType | None = None
_failed = False


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


def _ensure_ninja_on_path() -> None:
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
    key = "\0".join([*sources, *_flags(), torch.__version__, sys.version, _NAME, _cpu_model()])
    return cache_directory() / f"{_NAME}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _flags() -> list[str]:
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

    _ensure_ninja_on_path()
    folder = library.parent
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(folder)
    workdir = Path(tempfile.mkdtemp(prefix=f"build-{library.stem.rsplit('-', 1)[-1]}-", dir=folder))
    try:
        module = load_inline(
            name=_NAME,
            cpp_sources=[source.read_text() for source in SOURCES],
            functions=FUNCTIONS,
            extra_cflags=_flags(),
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


def prepare(compile_missing: bool = True) -> bool:
    """Load the cached kernel, or compile it here first (blocking) if it is missing and
    `compile_missing`. Returns whether the kernel is in use. Threads calling at once wait for one
    build; a failure is warned about once and remembered."""
    global _module, _failed
    if not enabled():
        return False
    with _lock:
        if _module is not None or _failed:
            return _module is not None
        try:
            library = _library_path()
            if library.exists():
                _module = _load_library(library)
            elif compile_missing:
                log.info("compiling the CPU kernels (once per machine, about a minute)")
                _module = _compile(library)
        except Exception as exc:  # compiler/ninja missing, build error, unwritable cache dir
            _failed = True
            log.warning("paged attention kernel unavailable, using the torch path: %s", exc)
        return _module is not None


def paged_attention_module() -> ModuleType | None:
    """The compiled extension, building it if needed; None if disabled or the build failed."""
    prepare()
    return _module if enabled() else None


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_paged_kernel(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether decode attention for `q` over `cache` goes through the C++ kernel: CPU only, q and
    cache of one supported dtype, and the extension loaded by `prepare`."""
    return (
        q.device.type == "cpu"
        and q.dtype == cache.dtype
        and q.dtype in KERNEL_DTYPES
        and _module is not None
        and enabled()
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q `[B, heads, D]` over k/v cache `[num_blocks, block_size, kv_heads, D]` through
    `block_tables` `[B, max_blocks]`, attending to the first `lengths[b]` positions -> `[B, heads, D]`.
    The caller checks `use_paged_kernel` first."""
    assert _module is not None
    return _module.paged_decode_attention(q, k_cache, v_cache, block_tables, lengths, scale)


def use_norm_kernel(x: torch.Tensor) -> bool:
    """Whether RMSNorm of `x` goes through the C++ kernel: bf16 on CPU, extension loaded."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and _module is not None and enabled()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis of a contiguous bf16 `x`; the caller checks `use_norm_kernel`."""
    assert _module is not None
    return _module.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta)) in bf16; the caller checks `use_norm_kernel`."""
    assert _module is not None
    total, normed = _module.add_rms_norm(x, delta, weight, eps)
    return total, normed


def use_fused_decode(qkv: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether a decode-only step's RoPE + cache write + attention go through one C++ call."""
    return (
        qkv.dtype == torch.bfloat16
        and cache.dtype == torch.bfloat16
        and qkv.device.type == "cpu"
        and _module is not None
        and enabled()
    )


def rope_cache_decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """qkv `[N, (heads + 2 kv_heads) * D]` -> attention output `[N, heads * D]`, after writing the
    RoPE'd keys and the values at `slots`; the caller checks `use_fused_decode`."""
    assert _module is not None
    return _module.rope_cache_decode_attention(
        qkv, cos, sin, k_cache, v_cache, slots, block_tables, lengths, num_heads, scale
    )


def q4_decode_layers(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    norms: list[torch.Tensor],
    packed: list[torch.Tensor],
    scales: list[torch.Tensor],
    num_heads: int,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder layer of a decode-only step on 4-bit weights: (MLP output, residual); the
    caller checks `use_fused_decode` (same conditions)."""
    assert _module is not None
    hidden, residual = _module.q4_decode_layers(
        x, cos, sin, cache, slots, block_tables, lengths, norms, packed, scales, num_heads, scale, eps
    )
    return hidden, residual


if __name__ == "__main__":  # `make` builds the kernels at install so no server waits for it
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(
        "CPU kernels (paged attention, RMSNorm, RoPE + cache):",
        "ready" if prepare() else "unavailable (torch path)",
    )
