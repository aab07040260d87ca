"""Cost of the sampler's per-step work: `python bench/sampler_bench.py`.

On SmolLM2's vocabulary (49,152), for a few batch sizes, old and new in one process, interleaved:
- drawing: the inverse-CDF draw (engine/sampler.py: one uniform per row) vs the "exponential
  race" it replaced (argmax of p / E, E ~ Exp(1) drawn per vocabulary entry);
- top_p = 0.9: the windowed cut (`Sampler._nucleus`) vs sorting the whole vocabulary, on
  softmax(randn x scale) rows: scale 3 is flat (nuclei of ~2,000 tokens), 10 is peaked (a few).
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


def full_sort_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = probs.sort(dim=-1, descending=True)
    drop = ordered.cumsum(dim=-1) - ordered >= top_p * ordered.sum(dim=-1, keepdim=True)
    drop[:, 0] = False
    return probs.scatter(1, order, ordered.masked_fill(drop, 0.0))


def compare(
    label: str, old: Callable[[], object], new: Callable[[], object], rounds: int, repeat: int
) -> None:
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(rounds):
        times["old"].append(timed(old, repeat))
        times["new"].append(timed(new, repeat))
    a, b = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"{label}: old {a:8.3f} ms, new {b:8.3f} ms ({b / a:.3f}x)", flush=True)


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

        compare(f"draw, {rows:3d} rows (race -> inverse CDF)", race, inverse_cdf, args.rounds, repeat)
        for scale in (3.0, 10.0):
            peaked = torch.softmax(torch.randn(rows, args.vocab) * scale, dim=-1)
            top_k = torch.full((rows,), args.vocab)
            top_p = torch.full((rows,), 0.9)

            def old(peaked: torch.Tensor = peaked) -> torch.Tensor:
                return full_sort_top_p(peaked, 0.9)

            def new(
                peaked: torch.Tensor = peaked, k: torch.Tensor = top_k, p: torch.Tensor = top_p
            ) -> torch.Tensor:
                return Sampler._nucleus(peaked, k, p)

            label = f"top_p 0.9, {rows:3d} rows, scale {scale:>4} (full sort -> window)"
            compare(label, old, new, args.rounds, max(3, repeat // 4))


if __name__ == "__main__":
    main()
