"""Streaming OpenAI chat client and the metrics of `vllm bench serve`.

Per request: TTFT (send -> first chunk carrying generated text; the end of the stream if none
did, as for a 1-token answer that is part of a character), ITL (gaps between successive such
chunks), E2E latency (send -> end of stream), TPOT = (E2E - TTFT) / (output_tokens - 1), where
output_tokens comes from the stream's final `usage` chunk (`stream_options.include_usage`).
Aggregates: mean/p50/p90/p99 of each (ITL over all gaps of all requests), request throughput,
output tokens/s and total (prompt + output) tokens/s over the run's wall time.

Chat (`/chat/completions`, `delta.content`) or text completions (`/completions`, `text`): a body
function turns each request into the body to send (default: the chat body of serve_bench.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson
from serve_workload import BenchRequest


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


Body = Callable[[BenchRequest], dict[str, Any]]


def _path(body: dict[str, Any]) -> str:
    return "/chat/completions" if "messages" in body else "/completions"


def _text(choice: dict[str, Any]) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def _data(event: bytes) -> bytes:
    """The `data:` of one SSE event; comments (llama.cpp's `: ping` keep-alives) carry none, and an
    `error:` field (llama.cpp's way to fail a stream) is raised."""
    data = b""
    for line in event.splitlines():
        field, _, value = line.partition(b":")
        if field == b"data":
            data += value.strip()
        elif field == b"error":
            raise ValueError(f"stream error: {value.strip()[:200]!r}")
    return data


async def send(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> RequestResult:
    """POST one streaming chat or text completion and time its chunks. A request that a kept-alive
    connection could not carry (the server had closed it: llama.cpp's does after a stream) is sent
    once more on a new one, timed from then."""
    try:
        return await _send(session, url, key, body)
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
        pass
    try:
        return await _send(session, url, key, body)
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        return RequestResult(ok=False, error=repr(exc))


async def _send(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> RequestResult:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    result = RequestResult(ok=False)
    start = time.perf_counter()
    try:
        async with session.post(f"{url}{_path(body)}", data=orjson.dumps(body), headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            try:
                await _read_stream(resp, result, start)
            except aiohttp.ClientError as exc:  # once the answer began, a lost connection is a failure
                result.error = repr(exc)
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
        raise  # not sent: `send` tries once more
    except (TimeoutError, ValueError, aiohttp.ClientError) as exc:
        result.error = repr(exc)
    return result


async def _read_stream(resp: aiohttp.ClientResponse, result: RequestResult, start: float) -> None:
    """Time the SSE chunks of one answer into `result`."""
    last = start
    buffer = b""
    async for raw in resp.content.iter_any():
        now = time.perf_counter()
        buffer += raw
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            data = _data(event)
            if not data or data == b"[DONE]":
                continue
            chunk = orjson.loads(data)
            choices = chunk.get("choices") or []
            if choices and _text(choices[0]):
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
            if usage := chunk.get("usage"):
                result.prompt_tokens = usage["prompt_tokens"]
                result.output_tokens = usage["completion_tokens"]
    result.e2e = time.perf_counter() - start
    result.ttft = result.ttft or result.e2e
    result.ok = result.output_tokens > 0
    if not result.ok:
        result.error = "no usage chunk in the stream"


def _session(limit: int) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=3600, sock_read=600)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=timeout)


async def closed_loop(
    url: str, key: str, model: str, requests: list[BenchRequest], concurrency: int, body: Body | None = None
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients, each sending its next request as soon as its last one finished."""
    queue = list(reversed(requests))
    results: list[RequestResult] = []
    make_body = body or (lambda r: r.body(model))

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            results.append(await send(session, url, key, make_body(queue.pop())))

    async with _session(concurrency) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return results, time.perf_counter() - start


async def open_loop(
    url: str, key: str, model: str, requests: list[BenchRequest], rate: float, seed: int = 0
) -> tuple[list[RequestResult], float]:
    """Requests sent at Poisson arrival times (`rate` per second, seeded), however many are in flight."""
    rng = random.Random(seed)
    async with _session(len(requests)) as session:
        start = time.perf_counter()
        tasks = []
        for i, request in enumerate(requests):
            if i:
                await asyncio.sleep(rng.expovariate(rate))
            tasks.append(asyncio.create_task(send(session, url, key, request.body(model))))
        results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - start


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    arr = np.asarray(values) * scale
    return {
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
    }


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """The `vllm bench serve` figures; latencies in milliseconds."""
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "request_throughput": len(ok) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _stats([gap for r in ok for gap in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
    }
