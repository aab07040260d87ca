"""Decode attention under fp32 activations over an fp32 KV cache against a 16-bit one, in one process.

`python bench/kv_cache_dtype_bench.py --cases 64x290 16x290 1x400`

Fills 30 layers of SmolLM2-shaped caches (9 query heads, 3 kv heads, head_dim 64, blocks of 16,
blocks shuffled through memory) in fp32, fp16 and bf16 with the same values, and times a step's
worth of fused RoPE + cache write + paged decode attention (every layer once,
`kernels.rope_cache_decode_attention`, as a decode-only step calls it) over each, alternately,
`--rounds` times. `BxL` is B sequences of random lengths in [L/2, L]. Reports the median per step,
the ratio to fp32, the cache bytes per token, and the largest difference of the outputs from fp32's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine_info import cpu_summary

from budrt.engine import kernels
from budrt.engine.kv_cache import KVCache

LAYERS, HEADS, KV_HEADS, DIM, BLOCK = 30, 9, 3, 64, 16
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def case(batch: int, longest: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(longest // 2, longest + 1, (batch,), generator=gen)
    per_seq = (lengths + BLOCK - 1) // BLOCK
    num_blocks = int(per_seq.sum()) + 1
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = torch.zeros(batch, int(per_seq.max()), dtype=torch.long)
    used = 0
    for row, count in enumerate(per_seq.tolist()):
        tables[row, :count] = order[used : used + count]
        used += count
    positions = lengths - 1
    slots = tables.gather(1, (positions // BLOCK).unsqueeze(1)).squeeze(1) * BLOCK + positions % BLOCK
    angles = positions.unsqueeze(1).float() * torch.rand(1, DIM // 2, generator=gen)
    cos = torch.cat([angles.cos(), angles.cos()], 1)
    sin = torch.cat([-angles.sin(), angles.sin()], 1)
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * DIM, generator=gen)
    return {"lengths": lengths, "tables": tables, "slots": slots, "cos": cos, "sin": sin, "qkv": qkv,
            "num_blocks": torch.tensor(num_blocks)}  # fmt: skip


def step(c: dict[str, torch.Tensor], cache: KVCache) -> torch.Tensor:
    outs = []
    rows = (c["qkv"], c["cos"], c["sin"])
    for layer in range(LAYERS):
        keys, values = cache.layer(layer)
        where = (c["slots"], c["tables"], c["lengths"])
        outs.append(kernels.rope_cache_decode_attention(*rows, keys, values, *where, HEADS, DIM**-0.5))
    return outs[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["64x290", "16x290", "1x400"])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not kernels.prepare():
        raise SystemExit("the CPU kernels could not be built here")
    print(cpu_summary())
    level = kernels.describe()["kernel_level"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels at {level}")
    print("| case | cache | ms per step (30 layers) | vs fp32 | bytes per token | max abs diff vs fp32 |")
    print("|---|---|---|---|---|---|")
    for spec in args.cases:
        batch, longest = (int(v) for v in spec.split("x"))
        c = case(batch, longest, seed=batch * 1000 + longest)
        values = torch.randn(LAYERS, 2, int(c["num_blocks"]), BLOCK, KV_HEADS, DIM)
        caches = {}
        for name, dtype in DTYPES.items():
            caches[name] = KVCache(LAYERS, int(c["num_blocks"]), BLOCK, KV_HEADS, DIM, dtype)
            caches[name].data.copy_(values)
        times: dict[str, list[float]] = {name: [] for name in DTYPES}
        outputs = {name: step(c, cache) for name, cache in caches.items()}  # warm-up
        for _ in range(args.rounds):
            for name, cache in caches.items():
                started = time.perf_counter()
                step(c, cache)
                times[name].append((time.perf_counter() - started) * 1000)
        base = statistics.median(times["fp32"])
        for name, dtype in DTYPES.items():
            ms = statistics.median(times[name])
            per_token = LAYERS * 2 * KV_HEADS * DIM * torch.tensor([], dtype=dtype).element_size()
            diff = (outputs[name] - outputs["fp32"]).abs().max().item()
            print(f"| {spec} | {name} | {ms:.2f} | {ms / base:.2f}x | {per_token} | {diff:.1e} |")


if __name__ == "__main__":
    main()
