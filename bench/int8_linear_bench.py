"""The int8 linears (engine/int8.py, FBGEMM) against fp32 `F.linear` (MKL), per row count.

`python bench/int8_linear_bench.py --threads 2 --rounds 7`

For each SmolLM2 linear shape (fused qkv 960x576, o 576x576, fused gate/up 3072x576, down
576x1536, lm_head 49152x576) and row count, times fp32 `F.linear` and `Int8Weight` (row
quantization with its Hadamard rotation included) alternately, `--rounds` times, and prints the
medians in milliseconds, the ratio, and a whole step's linears (30 layers of the four, plus the
lm_head) both ways. Also the relative error of the int8 product on random rows with two large
channels, as LLM activations have.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from machine_info import cpu_summary
from sampler_bench import timed  # ms per call

from budrt.engine import int8, kernels

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LM_HEAD = (49152, 576)
LAYERS = 30


def rows_like_activations(rows: int, width: int) -> torch.Tensor:
    x = torch.randn(rows, width) * torch.rand(rows, 1) * 3
    x[:, 7] *= 30
    x[:, width // 2 + 3] *= -20
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 256, 1024])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert kernels.prepare() and int8.available(), "needs the CPU kernels and FBGEMM"
    print(f"CPU: {cpu_summary()}; {args.threads} threads; torch {torch.__version__}")
    torch.manual_seed(0)
    weights = {name: torch.randn(*shape) * 0.05 for name, shape in (SHAPES | {"lm_head": LM_HEAD}).items()}
    packed = dict(zip(weights, int8.pack([int8.round_weight(w) for w in weights.values()]), strict=True))
    for rows in args.rows:
        step = {"fp32": 0.0, "int8": 0.0}
        for name, weight in weights.items():
            x = rows_like_activations(rows, weight.shape[1])
            calls = max(2, int(2000 / rows))
            fp32, quantized = [], []
            for _ in range(args.rounds):  # alternate, so noise falls on both sides alike
                fp32.append(timed(lambda x=x, w=weight: F.linear(x, w), calls))
                quantized.append(timed(lambda x=x, n=name: packed[n](x), calls))
            a, b = statistics.median(fp32), statistics.median(quantized)
            ref = F.linear(x, weight)
            error = ((packed[name](x) - ref).norm() / ref.norm()).item()
            weight_of = 1 if name == "lm_head" else LAYERS
            step["fp32"] += a * weight_of
            step["int8"] += b * weight_of
            line = f"rows {rows:5d} {name:8s} fp32 {a:8.3f} ms  int8 {b:8.3f} ms  x{a / b:4.2f}"
            print(f"{line}  error {error:.4f}")
        print(f"rows {rows:5d} a step's linears: fp32 {step['fp32']:.1f} ms, int8 {step['int8']:.1f} ms, "
              f"x{step['fp32'] / step['int8']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
