"""The forward path after auth and routing: limits, response cache, proxy, settling the limits.

`Traffic.send` owns an admitted request's rate-limit `Ticket` from then on and releases it
exactly once: with the actual token usage when the upstream reported it, with 0 (a full
refund) when no upstream answered or the cache did.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import Receive

from budrt.config import GatewayConfig, RateLimitConfig
from budrt.gateway.balancer import affinity_key
from budrt.gateway.cache import CACHE_LOOKUPS, ResponseCache, cache_control, cache_key, make_cache
from budrt.gateway.metrics import RequestTracker
from budrt.gateway.proxy import Proxy, UpstreamStream
from budrt.gateway.ratelimit import Limit, Limiter, LocalLimiter, Ticket
from budrt.gateway.routing import Deployment, Router
from budrt.gateway.usage import find_usage

CACHE_HEADER = "x-budrt-cache"


def make_limiter(config: GatewayConfig) -> Limiter:
    if config.redis_url:
        from budrt.gateway.redis_limiter import RedisLimiter

        return RedisLimiter(config.redis_url, config.ratelimit.fail_mode)
    return LocalLimiter()


def key_limits(key: Any, config: RateLimitConfig) -> tuple[Limit, ...]:
    """The limits of an API key. Callers append user/team/model scopes to this tuple."""
    rpm, tpm = getattr(key, "rpm", None), getattr(key, "tpm", None)
    rps, concurrent = config.key_rps, config.key_concurrency
    if not (rpm or tpm or rps or concurrent):
        return ()
    return (Limit(f"key:{key.id}", rpm=rpm, rps=rps, tpm=tpm, concurrent=concurrent),)


def reserve_tokens(body_len: int, data: dict[str, Any], default_max_tokens: int) -> int:
    """Tokens to hold before the call: ~4 bytes per prompt token plus the completion budget."""
    most = data.get("max_completion_tokens") or data.get("max_tokens")
    if not isinstance(most, int) or most <= 0:
        most = default_max_tokens
    n = data.get("n")
    return body_len // 4 + most * (n if isinstance(n, int) and n > 0 else 1)


def used_tokens(data: bytes | bytearray) -> int | None:
    usage = find_usage(data)
    if not usage:
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)


class Traffic:
    def __init__(self, config: GatewayConfig, router: Router, proxy: Proxy, limiter: Limiter) -> None:
        self.config = config
        self.router = router
        self.proxy = proxy
        self.limiter = limiter
        self.cache: ResponseCache | None = make_cache(config.cache, config.redis_url)
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.cache is not None:
            await self.cache.close()
        close = getattr(self.limiter, "close", None)
        if close is not None:
            await close()

    def _release_later(self, ticket: Ticket, used: int | None) -> None:
        """Release without awaiting (e.g. while being cancelled); the task is kept referenced."""
        task = asyncio.ensure_future(self.limiter.release(ticket, used))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def send(
        self,
        receive: Receive,
        headers: Headers,
        dep: Deployment,
        path: str,
        data: dict[str, Any],
        body: bytes,
        tracker: RequestTracker,
        ticket: Ticket | None,
    ) -> Response | UpstreamStream:
        stream = data.get("stream") is True
        extra = ticket.headers if ticket is not None else {}
        ckey = None
        if self.cache is not None and (ckey := cache_key(path, dep.name, data)) is not None:
            read, write = cache_control(headers)
            hit = await self.cache.get(ckey) if read else None
            CACHE_LOOKUPS.labels("hit" if hit else "miss" if read else "bypass").inc()
            if hit is not None:
                if ticket is not None:
                    self._release_later(ticket, 0)
                return Response(hit[1], media_type=hit[0], headers={**extra, CACHE_HEADER: "hit"})
            extra = {**extra, CACHE_HEADER: "miss"}
            ckey = ckey if write else None

        def body_for(d: Deployment) -> bytes:  # a fallback deployment gets its own model name
            return body if d is dep else orjson.dumps({**data, "model": d.name})

        chain = self.router.chain(dep) if dep.fallbacks else [dep]
        affinity = affinity_key(data, dep.affinity_key) if dep.strategy == "affinity" else None
        try:
            result = await self.proxy.forward(
                receive, chain, path, body_for, stream, tracker, extra, affinity
            )
        except BaseException:
            if ticket is not None:
                self._release_later(ticket, 0)
            raise
        if isinstance(result, UpstreamStream):
            if ticket is not None or ckey is not None:
                result.capture = self.config.cache.max_entry_bytes if ckey is not None else 0
                result.on_end = lambda s: self._stream_ended(s, ticket, ckey)
            return result
        ok = result.status_code == 200
        if ckey is not None and ok and len(result.body) <= self.config.cache.max_entry_bytes:
            await self.cache.set(ckey, result.headers.get("content-type", "application/json"), result.body)
        if ticket is not None:
            used = (used_tokens(result.body) if ok else 0) if any(x.tpm for x in ticket.limits) else None
            self._release_later(ticket, used)  # settled after the response, off its latency
        return result

    async def _stream_ended(self, stream: UpstreamStream, ticket: Ticket | None, ckey: str | None) -> None:
        if ckey is not None and stream.completed and stream.captured is not None and self.cache is not None:
            await self.cache.set(ckey, "text/event-stream", bytes(stream.captured))
        if ticket is not None:
            await self.limiter.release(ticket, used_tokens(stream.tail))
