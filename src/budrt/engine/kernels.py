"""Optional C++ kernels for the CPU engine, compiled on this machine once per ISA level (csrc/, one
extension, `budrt_cpu_kernels_<level>`; engine/cpu_features.py picks the level).

- paged_attention.cpp (+ attention_loops.cpp, its inner loops): decode attention straight from the
  paged cache through the block tables;
- rms_norm.cpp: bf16 RMSNorm with the residual add fused in (about twelve small ops per norm);
- silu_mul.cpp: the MLP's SiLU(gate) * up in one pass over the fused gate/up output;
- argmax.cpp: greedy tokens, each row's first maximum, in vector lanes;
- token_masks.cpp: a grammar's packed token masks on their rows' logits (-inf where forbidden);
- q8_linear.cpp: a linear on GGUF Q8_0 weights as stored (the logits of small decode steps);
- q4_linear.cpp: a linear on GGUF Q4 weights by int8 dot products (small decode steps; quant.py);
- rope_cache.cpp: a decode-only step's RoPE, cache write and attention in one call per layer (and
  the RoPE and cache write alone for steps with prompt chunks);
- decode_stack.cpp: all layers of a decode-only step in one call (decode_stack.py);
- quantize_rows.cpp: activations to per-row int8 levels, blockwise Hadamard-rotated (int8.py).
Built with torch's JIT extension builder (a C++ compiler and ninja, no network; kernel_build.py)
into `$TORCH_EXTENSIONS_DIR` or `~/.cache/budrt/torch_extensions`; later processes load the cached
build. `make` builds every level the compiler accepts (`python -m budrt.engine.kernels`), else the
first `prepare()` builds this machine's (about a minute); `BUDRT_CPU_ISA=avx2` picks a lower level.
A model server calls it before it reports ready, never mid-serving: switching paths mid-run would
change bf16 outputs (and so seeded sampling) between requests. If the build fails (one warning) the
engine takes the torch paths for good; `BUDRT_ENGINE_KERNELS=torch` forces them; so does a CPU
without AVX2 + FMA + F16C (no kernel level).
"""

from __future__ import annotations

import logging
import threading
import time
from types import ModuleType
from typing import Any

import torch

from budrt.engine import cpu_features, kernel_build
from budrt.engine.kernel_build import ENV_SWITCH as ENV_SWITCH
from budrt.engine.kernel_build import enabled
from budrt.observe.progress import NO_PROGRESS, ProgressReporter

log = logging.getLogger(__name__)

_lock = threading.Lock()  # one build per process, however many threads ask
_module: ModuleType | None = None
_failed: str | None = None  # why the kernels are not in use, once `prepare` gave up
_level: tuple[str | None, str] | None = None  # the level `prepare` chose, and why


def prepare(compile_missing: bool = True, progress: ProgressReporter = NO_PROGRESS) -> bool:
    """Load the cached CPU kernels of this CPU's level (or `BUDRT_CPU_ISA`'s), or compile them here
    first (blocking) if missing and `compile_missing`. Returns whether the kernels are in use.
    Threads calling at once wait for one build; a failure is warned about once and remembered.
    Raises ValueError if `BUDRT_CPU_ISA` asks for more than the CPU has. `progress` hears of a
    build (kernel_build.load)."""
    global _module, _failed, _level
    if not enabled():
        return False
    with _lock:
        if _module is not None or _failed is not None:
            return _module is not None
        _level = cpu_features.kernel_level()
        level, why = _level
        if level is None:
            _failed = why
            log.warning("CPU kernels %s; using the torch paths", why)
            return False
        try:
            _module = kernel_build.load(level, compile_missing, progress)
        except Exception as exc:  # compiler/ninja missing, build error, unwritable cache dir
            _failed = f"build failed: {exc}"
            log.warning("CPU kernels unavailable, using the torch paths: %s", exc)
        return _module is not None


def describe() -> dict[str, Any]:
    """What runs this process's steps, for the log and `budrt status`: the CPU, its flags of
    interest, the kernel level and why, and whether the kernels are loaded (else why not)."""
    features = cpu_features.detect()
    level, why = _level or cpu_features.kernel_level()
    if _module is not None:
        state = "loaded"
    elif not enabled():
        state = f"not loaded: {ENV_SWITCH}=torch"
    else:
        state = f"not loaded: {_failed or 'not built yet'}"
    return {
        "cpu": features.model,
        "cpu_flags": features.flags(),
        "kernel_level": level,
        "kernel_level_reason": why,
        "kernels_loaded": _module is not None,
        "kernels": state,
    }


def build_all() -> list[str]:
    """Compile every level the compiler accepts into the cache, one after the other, without
    loading any (this CPU may not run them), so that a later `BUDRT_CPU_ISA` needs no compile.
    A level the compiler cannot build is one warning. Returns the levels built or cached."""
    built = []
    for level in cpu_features.LEVELS:
        started = time.monotonic()
        try:
            kernel_build.build(level)
        except Exception as exc:  # an older compiler without the level's flags
            log.warning("CPU kernels for %s not built: %s", level, exc)
            continue
        log.info("CPU kernels for %s: ready (%.0f s)", level, time.monotonic() - started)
        built.append(level)
    return built


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def reads_cache(activations: torch.dtype, cache: torch.dtype) -> bool:
    """Whether the kernels read a cache of `cache` dtype under `activations`: the same dtype, or
    bf16/fp16 under fp32 (engine/kv_cache.py)."""
    return cache == activations or (activations == torch.float32 and cache in (torch.bfloat16, torch.float16))


def use_paged_kernel(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether decode attention for `q` over `cache` goes through the C++ kernel: CPU only, q and
    cache of dtypes it reads, and the extension loaded by `prepare`."""
    return (
        q.device.type == "cpu"
        and reads_cache(q.dtype, cache.dtype)
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


POINTWISE_DTYPES = (torch.bfloat16, torch.float32)  # RMSNorm, SiLU * up, RoPE + cache write


def use_norm_kernel(x: torch.Tensor) -> bool:
    """Whether RMSNorm of `x` goes through the C++ kernel: bf16 or fp32 on CPU, extension loaded."""
    return x.dtype in POINTWISE_DTYPES and x.device.type == "cpu" and _module is not None and enabled()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis of a contiguous bf16/fp32 `x` (weight of its dtype); the caller
    checks `use_norm_kernel`."""
    assert _module is not None
    return _module.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta)) in x's dtype; the caller checks `use_norm_kernel`."""
    assert _module is not None
    total, normed = _module.add_rms_norm(x, delta, weight, eps)
    return total, normed


def use_silu_kernel(gate_up: torch.Tensor) -> bool:
    """Whether the MLP's SiLU(gate) * up goes through the C++ kernel: contiguous bf16/fp32 on CPU."""
    return gate_up.is_contiguous() and use_norm_kernel(gate_up)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up from `gate_up` `[N, 2 * I]` -> `[N, I]` of its dtype; the caller checks
    `use_silu_kernel`."""
    assert _module is not None
    return _module.silu_mul(gate_up)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """`logits.max(dim=-1).indices` for fp32 CPU `[M, V]` logits, or None where the kernel does not
    apply (then the caller takes torch's)."""
    if _module is None or not enabled() or logits.dtype != torch.float32 or logits.device.type != "cpu":
        return None
    if logits.dim() != 2 or logits.shape[1] == 0 or logits.stride(1) != 1:
        return None
    return _module.argmax_rows(logits)


def apply_token_masks(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> bool:
    """Row `rows[r]` of fp32 CPU `logits` `[M, V]` gets -inf where `bitmask[r]` (int32 words of
    packed bits) forbids a token, in place; False where the kernel does not apply (nothing done)."""
    if _module is None or not enabled() or logits.dtype != torch.float32 or logits.device.type != "cpu":
        return False
    if logits.dim() != 2 or logits.stride(1) != 1:
        return False
    _module.apply_token_masks(logits, rows, bitmask)
    return True


def q8_linear(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """`x` bf16/fp32 `[M, K]` @ W^T with W in Q8_0 (`values` int8 `[N, K]`, `scales` fp32
    `[N, K / 32]`) -> `[M, N]` in x's dtype, or None where the kernel is not built (the caller uses
    its dense weights)."""
    if _module is None or not enabled():
        return None
    return _module.q8_linear(x, values, scales)


def q4_tiles_available() -> bool:
    """Whether the loaded build has `q4_tiles_linear` (both levels, avx2 and avx512, do)."""
    return _module is not None and enabled() and bool(_module.q4_tiles_supported())


def q4_tiles_linear(x: torch.Tensor, packed: torch.Tensor, dm: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """`x` bf16/fp32 `[M, K]` @ W^T with W packed by `quant.pack_tiles` -> `[M, N]` in x's dtype.
    `rounds`: int8 roundings of each 32-block of x, 2 (about fp32's accuracy) or 1 (about bf16's,
    about twice as fast at one row with AVX2). The caller checks `q4_tiles_available` (at
    packing time)."""
    assert _module is not None
    return _module.q4_tiles_linear(x, packed, dm, rounds)


def quantize_rows(x: torch.Tensor, block: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `x` `[N, K]`, each `block` inputs Hadamard-rotated, as (integers in -levels..levels
    stored as fp32 `[N, K]`, per-row scales `[N, 1]`); see csrc/quantize_rows.cpp. The caller
    checks `prepare()` (at load)."""
    assert _module is not None
    return _module.quantize_rows(x, block, levels)


def use_fused_rope(qkv: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether a step's RoPE + cache write (+ attention, for a decode-only step) go through one C++
    call per layer: bf16 or fp32, the cache alike (or 16-bit under fp32)."""
    return (
        qkv.dtype in POINTWISE_DTYPES
        and reads_cache(qkv.dtype, cache.dtype)
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
    RoPE'd keys and the values at `slots`; the caller checks `use_fused_rope`."""
    assert _module is not None
    return _module.rope_cache_decode_attention(
        qkv, cos, sin, k_cache, v_cache, slots, block_tables, lengths, num_heads, scale
    )


def rope_cache_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv `[N, (heads + 2 kv_heads) * D]` -> RoPE'd (q `[N, heads, D]`, keys `[N, kv_heads, D]`),
    after writing the keys and the values at `slots`; the caller checks `use_fused_rope`."""
    assert _module is not None
    return _module.rope_cache_write(qkv, cos, sin, k_cache, v_cache, slots, num_heads)


def decode_layers(
    weights: str,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    norms: list[torch.Tensor],
    linears: list[torch.Tensor],
    scales: list[torch.Tensor],
    num_heads: int,
    scale: float,
    eps: float,
    split_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder layer of a decode-only step, bf16 or fp32: (MLP output, residual). `weights`
    "q4": `linears` and `scales` are quant.pack_tiles' 4-bit tiles; "dense": `linears` are the
    dense weights (bf16: oneDNN-packed, `linear.Linear.weight`; fp32: the plain `[out, in]` weights)
    and `scales` is unused; those take at most `split_rows` rows per call (0: any). The caller
    checks `use_fused_rope`."""
    assert _module is not None
    step = (x, cos, sin, cache, slots, block_tables, lengths, norms, linears, scales)
    hidden, residual = _module.decode_layers(weights, *step, num_heads, scale, eps, split_rows)
    return hidden, residual


if __name__ == "__main__":  # `make` builds the kernels at install so no server waits for it
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("CPU kernels built:", ", ".join(build_all()) or "none (torch paths)")
    print("CPU kernels:", "ready" if prepare() else "unavailable (torch paths)", describe())
