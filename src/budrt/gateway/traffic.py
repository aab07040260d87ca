"""The forward path after auth and routing: limits, response cache, proxy, settling the limits.

`Traffic.send` owns an admitted request's rate-limit `Ticket` from then on and releases it
exactly once: with the actual token usage when the upstream reported it, with 0 (a full
refund) when no upstream answered or the cache did. For a whole upstream response the release
is handed to the response's sender as `Buffered.after`, run once the response is out; a stream
releases when it ends.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from functools import partial
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.types import Receive

from budrt.config import DeploymentConfig, GatewayConfig, RateLimitConfig, reveal
from budrt.gateway.balancer import affinity_key
from budrt.gateway.cache import CACHE_LOOKUPS, ResponseCache, cache_control, cache_key, make_cache
from budrt.gateway.local_limiter import LocalLimiter
from budrt.gateway.metrics import RequestTracker
from budrt.gateway.proxy import Proxy
from budrt.gateway.ratelimit import Limit, Limiter, Seed, Ticket
from budrt.gateway.routing import Deployment, Router
from budrt.gateway.stream import Buffered, UpstreamStream, encode_headers
from budrt.gateway.usage import find_usage

CACHE_HEADER = "x-budrt-cache"


def make_limiter(config: GatewayConfig, seed: Seed | None = None) -> Limiter:
    """Redis when configured (budgets live there); else in process, budgets seeded by `seed`."""
    if config.redis_url:
        from budrt.gateway.redis_limiter import RedisLimiter

        return RedisLimiter(config.redis_url.get_secret_value(), config.ratelimit.fail_mode)
    return LocalLimiter(seed)


def key_limits(key: Any, config: RateLimitConfig) -> tuple[Limit, ...]:
    """The limits of a principal: its key's (plus the configured per-key rps and concurrency),
    then its user's and team's. Callers append the model's scope to this tuple."""
    quotas: tuple[Limit, ...] = getattr(key, "quotas", ())
    if not quotas and (getattr(key, "rpm", None) or getattr(key, "tpm", None)):
        quotas = (Limit(f"key:{key.id}", rpm=key.rpm, tpm=key.tpm),)  # built without quotas
    rps, concurrent = config.key_rps, config.key_concurrency
    if not (rps or concurrent):
        return quotas
    scope = f"key:{key.id}"
    if quotas and quotas[0].scope == scope:
        return (replace(quotas[0], rps=rps, concurrent=concurrent), *quotas[1:])
    return (Limit(scope, rps=rps, concurrent=concurrent), *quotas)


def model_limits(deployments: list[DeploymentConfig]) -> dict[str, Limit]:
    """`model:<name>` limits of the deployments that set any (shared by every caller)."""
    found = {}
    for d in deployments:
        if d.rpm or d.rps or d.tpm or d.max_concurrent:
            found[d.model] = Limit(
                f"model:{d.model}", rpm=d.rpm, rps=d.rps, tpm=d.tpm, concurrent=d.max_concurrent
            )
    return found


def image_count(data: dict[str, Any]) -> int:
    """Images a generation request asks for: its `n`, default 1 (what image budgets count)."""
    n = data.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def reserve_tokens(body_len: int, data: dict[str, Any], default_max_tokens: int) -> int:
    """Tokens to hold before the call: ~4 bytes per prompt token plus the completion budget."""
    most = data.get("max_completion_tokens") or data.get("max_tokens")
    if not isinstance(most, int) or most <= 0:
        most = default_max_tokens
    n = data.get("n")
    return body_len // 4 + most * (n if isinstance(n, int) and n > 0 else 1)


def used_tokens(data: bytes | bytearray, usage: dict[str, Any] | None = None) -> int | None:
    """Total tokens of the usage object in `data` (or `usage`, when the caller found it already)."""
    usage = usage or find_usage(data)
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
        self.cache: ResponseCache | None = make_cache(config.cache, reveal(config.redis_url))
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
    ) -> Buffered | UpstreamStream:
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
                headers = [(b"content-type", hit[0].encode("latin-1"))]
                return Buffered(200, hit[1], headers, encode_headers({**extra, CACHE_HEADER: "hit"}))
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
            ctype = result.header(b"content-type") or b"application/json"
            await self.cache.set(ckey, ctype.decode("latin-1"), result.body)
        if ticket is not None:
            used = (used_tokens(result.body, result.usage) if ok else 0) if ticket.settles else None
            # Settled by the caller once the response is sent: off its latency, and in the
            # request's own task (a task per request for this was a visible cost).
            result.after = partial(self.limiter.release, ticket, used)
        return result

    async def _stream_ended(self, stream: UpstreamStream, ticket: Ticket | None, ckey: str | None) -> None:
        if ckey is not None and stream.completed and stream.captured is not None and self.cache is not None:
            await self.cache.set(ckey, "text/event-stream", bytes(stream.captured))
        if ticket is not None:
            await self.limiter.release(ticket, used_tokens(stream.tail))
