"""Cost of drawing a token from each row's distribution: `python bench/sampler_bench.py`.

Compares the sampler's inverse-CDF draw (engine/sampler.py: one uniform per row) with the
"exponential race" it replaced (argmax of p / E, E ~ Exp(1) drawn per vocabulary entry), on
SmolLM2's vocabulary (49,152), for a few batch sizes. Both in one process, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from budrt.engine.sampler import Sampler


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    generator = torch.Generator().manual_seed(0)
    for rows in args.rows:
        probs = torch.softmax(torch.randn(rows, args.vocab), dim=-1)
        repeat = max(5, 400 // rows)

        def race(probs: torch.Tensor = probs) -> torch.Tensor:
            return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)

        def inverse_cdf(probs: torch.Tensor = probs) -> torch.Tensor:
            draws = torch.rand(probs.shape[0], dtype=torch.float64, generator=generator)
            return Sampler._invert(probs, draws)

        times: dict[str, list[float]] = {"exponential race": [], "inverse CDF": []}
        for _ in range(args.rounds):
            times["exponential race"].append(timed(race, repeat))
            times["inverse CDF"].append(timed(inverse_cdf, repeat))
        medians = {name: statistics.median(values) for name, values in times.items()}
        print(
            f"rows {rows:3d}: exponential race {medians['exponential race']:7.3f} ms, "
            f"inverse CDF {medians['inverse CDF']:7.3f} ms "
            f"({medians['inverse CDF'] / medians['exponential race']:.3f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
