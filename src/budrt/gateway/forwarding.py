"""The forward path after auth and routing: limits, response cache, proxy, settling the limits.

`Forwarder.send` owns an admitted request's rate-limit `Ticket` from then on and releases it
exactly once: with the actual token usage when the upstream reported it, with 0 (a full
refund) when no upstream answered or the cache did. For a whole upstream response the release
is handed to the response's sender as `Buffered.after`, run once the response is out; a stream
releases when it ends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import orjson
from starlette.requests import Request

from budrt.config import DeploymentConfig, GatewayConfig, RateLimitConfig, reveal
from budrt.gateway.balancer import affinity_key
from budrt.gateway.cache import (
    CACHE_LOOKUPS,
    ResponseCache,
    cache_control,
    cache_key,
    cache_tenant,
    make_cache,
)
from budrt.gateway.local_limiter import LocalLimiter
from budrt.gateway.metrics import RequestTracker
from budrt.gateway.proxy import Proxy
from budrt.gateway.ratelimit import Limit, Limiter, LimiterUnavailable, RateLimited, Seed, Ticket
from budrt.gateway.routing import Deployment, Router
from budrt.gateway.stream import Buffered, UpstreamStream, encode_headers
from budrt.gateway.usage import find_usage
from budrt.protocol.errors import invalid_request
from budrt.security.rbac import Principal

CACHE_HEADER = "x-budrt-cache"


def make_limiter(config: GatewayConfig, seed: Seed | None = None) -> Limiter:
    """Redis when configured (budgets live there; its fail-open fallback seeds them by `seed`);
    else in process, budgets seeded by `seed`."""
    if config.redis_url:
        from budrt.gateway.redis_limiter import RedisLimiter

        rl = config.ratelimit
        url = config.redis_url.get_secret_value()
        return RedisLimiter(url, rl.fail_mode, seed=seed, budget_fail_mode=rl.budget_fail_mode)
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


def _count(data: dict[str, Any], name: str, least: int) -> int | None:
    """`data[name]` as an integer >= `least` (an integral float counts); None when absent or
    null. Anything else is a 400 here: the model server may read "100" or true as a number
    while the reservation would not, so the limits would not hold what is generated."""
    value = data.get(name)
    if value is None:
        return None
    if value.__class__ is float and value.is_integer():
        value = int(value)
    if value.__class__ is not int or value < least:
        raise invalid_request(f"`{name}` must be an integer of at least {least}.", param=name)
    return value


def image_count(data: dict[str, Any]) -> int:
    """Images a generation request asks for: its `n`, default 1 (what image budgets count)."""
    return _count(data, "n", 1) or 1


def reserve_tokens(
    body_len: int, data: dict[str, Any], default_max_tokens: int, embeddings: bool = False
) -> int:
    """Tokens to hold before the call: ~4 bytes per prompt token plus the completion budget
    (`max_tokens` x `n`). Embeddings generate nothing: the input estimate only. The limiters
    clamp what they charge (`ratelimit.charge`), so a huge `max_tokens` or `n` costs at most
    MAX_CHARGE here, and a tpm bucket at most its whole capacity."""
    if embeddings:
        return body_len // 4
    most = _count(data, "max_completion_tokens", 0)
    fallback = _count(data, "max_tokens", 0)
    if most is None:
        most = fallback if fallback is not None else default_max_tokens
    return body_len // 4 + most * (_count(data, "n", 1) or 1)


def dump_body(data: dict[str, Any]) -> bytes:
    """`data` as a body again (an alias or fallback renames the model); 400 when it nests deeper
    than orjson writes (it reads deeper than it writes), not a 500."""
    try:
        return orjson.dumps(data)
    except TypeError:
        raise invalid_request("The request body is nested too deeply.") from None


def stream_flag(data: dict[str, Any]) -> bool:
    """The request's `stream`; 400 unless a boolean (a server reading "true" as true would
    stream to a gateway relaying the answer as one body)."""
    stream = data.get("stream")
    if stream is True:
        return True
    if stream is None or stream is False:
        return False
    raise invalid_request("`stream` must be a boolean.", param="stream")


def used_tokens(data: bytes | bytearray, usage: dict[str, Any] | None = None) -> int | None:
    """Total tokens of the usage object in `data` (or `usage`, when the caller found it already);
    None when there is none or it holds no usable count."""
    usage = usage or find_usage(data)
    if not usage:
        return None
    total = usage.get("total_tokens")
    if total.__class__ is int:
        return total if total >= 0 else None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    counts = [c for c in (prompt, completion) if c.__class__ is int and c >= 0]
    return sum(counts) if counts else None


def served(used: int | None) -> int | None:
    """The usage a served answer settles with: 0 tokens (an image answer has none) becomes None,
    "keep the charge", since 0 tells the limiters nothing was served and refunds image budgets."""
    return None if used == 0 else used


@dataclass(slots=True)
class Outgoing:
    """An admitted request on its way upstream: built once by the gateway's `forward`."""

    request: Request  # the client's: its headers (Cache-Control), its receive (disconnects)
    chain: list[Deployment]  # the deployment asked for, then the fallbacks the caller may use
    path: str  # appended to an endpoint's base URL, e.g. "/chat/completions"
    data: dict[str, Any]
    body: bytes
    tracker: RequestTracker
    principal: Principal
    stream: bool
    cost: tuple[int, int] = (0, 0)  # (tokens, images) a fallback's own limits are charged
    content_type: str | None = None  # the body's when it is not JSON (a multipart image edit)


class Forwarder:
    """Runs an admitted request through the response cache and the proxy (failover, fallbacks
    within their own limits), and settles its rate-limit tickets."""

    def __init__(
        self,
        config: GatewayConfig,
        router: Router,
        proxy: Proxy,
        limiter: Limiter,
        model_limits: dict[str, Limit] | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.proxy = proxy
        self.limiter = limiter
        self.model_limits = model_limits or {}  # a fallback model's own limits apply when it serves
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

    def _release_later(self, tickets: list[Ticket], used: int | None) -> None:
        """Release without awaiting (e.g. while being cancelled); the task is kept referenced."""
        for ticket in tickets:
            task = asyncio.ensure_future(self.limiter.release(ticket, used))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _release(self, tickets: list[Ticket], used: int | None) -> None:
        for ticket in tickets:
            await self.limiter.release(ticket, used)

    async def send(self, out: Outgoing, ticket: Ticket | None) -> Buffered | UpstreamStream:
        """Serve a request admitted with `ticket` by `out.chain[0]`, else by the fallbacks after
        it; a fallback's own limits are charged `out.cost` when it is about to be tried
        (`_admit_fallback`)."""
        tickets = [ticket] if ticket is not None else []
        try:
            result, ckey = await self._send(out, tickets)
        except BaseException:
            self._release_later(tickets, 0)  # no answer reaches the client: a full refund
            raise
        if isinstance(result, UpstreamStream):
            if tickets or ckey is not None:
                result.capture = self.config.cache.max_entry_bytes if ckey is not None else 0
                result.on_end = partial(self._stream_ended, tickets=tickets, ckey=ckey)
            return result
        ok = result.status_code == 200
        if tickets:
            settles = tickets[0].settles if len(tickets) == 1 else any(t.settles for t in tickets)
            used = (served(used_tokens(result.body, result.usage)) if ok else 0) if settles else None
            # Settled by the caller once the response is sent: off its latency, and in the
            # request's own task (a task per request for this was a visible cost).
            if len(tickets) == 1:
                result.after = partial(self.limiter.release, tickets[0], used)
            else:
                result.after = partial(self._release, tickets, used)
        return result

    async def _send(
        self, out: Outgoing, tickets: list[Ticket]
    ) -> tuple[Buffered | UpstreamStream, str | None]:
        """The response (from the cache, or upstream and then cached) and the cache key a stream
        is to be stored under. `tickets` gains the ticket of the fallback tried last, if it has
        limits, and loses all on a cache hit (released)."""
        chain, data = out.chain, out.data
        dep = chain[0]
        extra = tickets[0].headers if tickets else {}
        ckey = None
        tenant = cache_tenant(out.principal, self.config.cache.scope) if self.cache is not None else ""
        if self.cache is not None and (ckey := cache_key(out.path, dep.name, data, tenant)) is not None:
            read, write = cache_control(out.request.headers)
            hit = await self.cache.get(ckey) if read else None
            CACHE_LOOKUPS.labels("hit" if hit else "miss" if read else "bypass").inc()
            if hit is not None:
                self._release_later(tickets, 0)
                tickets.clear()
                headers = [(b"content-type", hit[0].encode("latin-1"))]
                return Buffered(200, hit[1], headers, encode_headers({**extra, CACHE_HEADER: "hit"})), None
            extra = {**extra, CACHE_HEADER: "miss"}
            ckey = ckey if write else None

        def body_for(d: Deployment) -> bytes:  # a fallback deployment gets its own model name
            return out.body if d is dep else dump_body({**data, "model": d.name})

        admit = partial(self._admit_fallback, tickets, len(tickets), out.cost) if len(chain) > 1 else None
        affinity = affinity_key(data, dep.affinity_key) if dep.strategy == "affinity" else None
        result = await self.proxy.forward(
            out.request.receive,
            chain,
            out.path,
            body_for,
            out.stream,
            out.tracker,
            extra,
            affinity,
            admit,
            out.content_type,
        )
        if ckey is not None and isinstance(result, Buffered):
            if result.status_code == 200 and len(result.body) <= self.config.cache.max_entry_bytes:
                ctype = result.header(b"content-type") or b"application/json"
                await self.cache.set(ckey, ctype.decode("latin-1"), result.body)
        return result, ckey

    async def _admit_fallback(
        self, tickets: list[Ticket], own: int, cost: tuple[int, int], dep: Deployment
    ) -> bool:
        """Before fallback `dep` is tried: charge its own `model:` limits, as if it had been asked
        for; False (skip it) when they refuse. `tickets[own:]` holds the charge of the fallback
        tried before, which served nothing: it is refunded first."""
        if len(tickets) > own:  # in a task: a cancel arriving now must not lose the ticket
            self._release_later([tickets.pop()], 0)
        limit = self.model_limits.get(dep.name)
        if limit is None:
            return True
        try:
            tickets.append(await self.limiter.acquire((limit,), *cost))
        except (RateLimited, LimiterUnavailable):
            return False
        return True

    async def _stream_ended(self, stream: UpstreamStream, tickets: list[Ticket], ckey: str | None) -> None:
        if ckey is not None and stream.completed and stream.captured is not None and self.cache is not None:
            await self.cache.set(ckey, "text/event-stream", bytes(stream.captured))
        if tickets:
            await self._release(tickets, served(used_tokens(stream.tail)))
