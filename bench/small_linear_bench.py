"""The engine's small-step linears against fp32 GEMM, per row count, in one process.

`python bench/small_linear_bench.py --threads 2 --rounds 7`

For each SmolLM2 linear shape (fused qkv 960x576, o 576x576, fused gate/up 3072x576, down
576x1536) and row count, times `F.linear` in fp32 on the dequantized weights (MKL/oneDNN, what a
non-4-bit step runs) and the 4-bit tile kernel (`kernels.q4_tiles_linear`, two and one int8
roundings of x), alternately, `--rounds` times; for the Q8_0 lm_head (49152x576) at 1-8 rows
`kernels.q8_linear` against fp32 `F.linear`. Prints medians in microseconds and, per shape, the
first row count where fp32 GEMM is faster (the engine's `q4_decode_rows` is one below it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from budrt.engine import kernels, quant

Q4_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LM_HEAD = (49152, 576)
Q4_1, Q8_0 = GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0


def cpu() -> str:
    """The CPU model and its vector flags, as /proc/cpuinfo lists them."""
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    vector = [f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))]
    return f"{model} ({' '.join(vector)})"


def median_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def compare(cases: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median time of each case, the cases taken in turn every round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(median_us(fn, calls))
    return {name: statistics.median(values) for name, values in times.items()}


def random_blocks(kind: GGMLQuantizationType, shape: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return quantize(rng.standard_normal(shape).astype(np.float32), kind)


def q4_table(rows: list[int], rounds: int) -> None:
    print("shape           rows   fp32 us  q4x2 us  q4x1 us")
    for name, shape in Q4_SHAPES.items():
        q4 = quant.from_gguf(random_blocks(Q4_1, shape), Q4_1, shape)
        assert q4 is not None
        packed, dm = quant.pack_tiles(q4)
        weight = q4.dequantize()
        crossover: dict[int, int | None] = {2: None, 1: None}
        for m in rows:
            x = torch.randn(m, shape[1])
            cases = {
                "fp32": partial(F.linear, x, weight),
                "q4x2": partial(kernels.q4_tiles_linear, x, packed, dm, 2),
                "q4x1": partial(kernels.q4_tiles_linear, x, packed, dm, 1),
            }
            t = compare(cases, rounds, max(10, 400 // m))
            for r in (2, 1):
                if crossover[r] is None and t["fp32"] < t[f"q4x{r}"]:
                    crossover[r] = m
            label = f"{name} {shape[0]}x{shape[1]}"
            print(f"{label:15s} {m:4d} {t['fp32']:9.1f} {t['q4x2']:8.1f} {t['q4x1']:8.1f}", flush=True)
        print(f"{name}: fp32 first faster at rows {crossover[2]} (two roundings), {crossover[1]} (one)")


def q8_table(rows: list[int], rounds: int) -> None:
    q8 = quant.q8_from_gguf(random_blocks(Q8_0, LM_HEAD), Q8_0, LM_HEAD)
    assert q8 is not None
    weight = q8.dequantize()
    print("lm_head 49152x576  rows   fp32 us    q8 us")
    for m in rows:
        x = torch.randn(m, LM_HEAD[1])
        cases = {
            "fp32": partial(F.linear, x, weight),
            "q8": partial(kernels.q8_linear, x, q8.values, q8.scales),
        }
        t = compare(cases, rounds, max(5, 40 // m))
        print(f"{'':18s} {m:4d} {t['fp32']:9.1f} {t['q8']:8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--q8-rows", default="1,2,4,8")
    parser.add_argument("--only", choices=["q4", "q8"], default=None)
    args = parser.parse_args()
    assert kernels.prepare() and kernels.q4_tiles_available(), "the CPU kernels are not built here"
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu()}; torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds")
    with torch.inference_mode():
        if args.only != "q8":
            q4_table([int(r) for r in args.rows.split(",")], args.rounds)
        if args.only != "q4":
            q8_table([int(r) for r in args.q8_rows.split(",")], args.rounds)


if __name__ == "__main__":
    main()
