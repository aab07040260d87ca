"""Rate limits and quotas: requests per second/minute, tokens per minute, concurrent requests.

A request is checked against a list of `Limit`s (one per scope: key, user, team, model...), all
or nothing. Requests per window use an exact sliding-window log, so no window of that length
ever admits more than the limit; tokens use a token bucket that the caller reserves from before
the call (prompt estimate + max_tokens) and settles with the actual usage after it. Concurrency
is a set of leases that expire, so a crashed gateway cannot leak slots forever.

`LocalLimiter` keeps this in process memory; `budrt.gateway.redis_limiter.RedisLimiter` does the
same in one atomic Lua script per call, exact across every gateway sharing the Redis.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

LEASE_S = 600.0  # a concurrency slot not released within this is reclaimed


@dataclass(frozen=True, slots=True)
class Limit:
    """The limits of one scope, e.g. `Limit("key:12", rpm=60)`; None = unlimited."""

    scope: str
    rpm: int | None = None
    rps: int | None = None
    tpm: int | None = None
    concurrent: int | None = None


@dataclass(slots=True)
class Ticket:
    """What an admitted request holds until `release`: its token reservation and lease."""

    limits: tuple[Limit, ...]
    lease: str
    reserved: int
    headers: dict[str, str]
    local: bool = True  # False: held in Redis


class RateLimited(Exception):
    def __init__(self, scope: str, kind: str, limit: int, retry_after_s: float) -> None:
        super().__init__("rate limited")
        self.scope = scope
        self.kind = kind  # "requests", "tokens" or "concurrent"
        self.limit = limit
        self.retry_after_s = retry_after_s

    def message(self) -> str:
        what = {
            "rpm": "requests per minute",
            "rps": "requests per second",
            "tpm": "tokens per minute",
            "concurrent": "concurrent requests",
        }[self.kind]
        return f"Rate limit reached: {self.limit} {what} for this {self.scope.split(':')[0]}."

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        if self.kind in ("rpm", "rps"):
            headers["x-ratelimit-limit-requests"] = str(self.limit)
            headers["x-ratelimit-remaining-requests"] = "0"
            headers["x-ratelimit-reset-requests"] = duration(self.retry_after_s)
        elif self.kind == "tpm":
            headers["x-ratelimit-limit-tokens"] = str(self.limit)
            headers["x-ratelimit-remaining-tokens"] = "0"
            headers["x-ratelimit-reset-tokens"] = duration(self.retry_after_s)
        return headers


class LimiterUnavailable(Exception):
    """The shared store is unreachable and the policy is fail-closed."""


class Limiter(Protocol):
    async def acquire(self, limits: tuple[Limit, ...], tokens: int) -> Ticket: ...

    async def release(self, ticket: Ticket, used_tokens: int | None) -> None: ...


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


def limit_headers(limit: Limit, remaining_requests: int, reset_requests: float, tokens_left: float) -> dict:
    """`x-ratelimit-*` headers for the first scope (the key), as OpenAI sends them."""
    headers: dict[str, str] = {}
    rate = limit.rpm or limit.rps
    if rate:
        headers["x-ratelimit-limit-requests"] = str(rate)
        headers["x-ratelimit-remaining-requests"] = str(max(0, remaining_requests))
        headers["x-ratelimit-reset-requests"] = duration(reset_requests)
    if limit.tpm:
        headers["x-ratelimit-limit-tokens"] = str(limit.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, int(tokens_left)))
        headers["x-ratelimit-reset-tokens"] = duration(max(0.0, limit.tpm - tokens_left) * 60 / limit.tpm)
    return headers


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, capacity: int, now: float) -> None:
        self.tokens = float(capacity)
        self.at = now

    def refill(self, capacity: int, now: float) -> float:
        self.tokens = min(float(capacity), self.tokens + (now - self.at) * capacity / 60.0)
        self.at = now
        return self.tokens


class LocalLimiter:
    """In-process limits: exact for one gateway process (and the fail-open fallback)."""

    def __init__(self) -> None:
        self._logs: dict[tuple[str, float], deque[float]] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._ids = itertools.count()

    def _log(self, scope: str, window: float, now: float) -> deque[float]:
        log = self._logs.get((scope, window))
        if log is None:
            log = self._logs[(scope, window)] = deque()
        cutoff = now - window
        while log and log[0] <= cutoff:
            log.popleft()
        return log

    def try_acquire(self, limits: tuple[Limit, ...], tokens: int) -> Ticket:
        now = time.monotonic()
        # Check every scope before changing any, so a refusal costs nothing anywhere.
        for lim in limits:
            for kind, window, rate in (("rps", 1.0, lim.rps), ("rpm", 60.0, lim.rpm)):
                if rate:
                    log = self._log(lim.scope, window, now)
                    if len(log) >= rate:
                        raise RateLimited(lim.scope, kind, rate, log[-rate] + window - now)
            if lim.tpm:
                bucket = self._buckets.get(lim.scope)
                have = bucket.refill(lim.tpm, now) if bucket else float(lim.tpm)
                need = min(tokens, lim.tpm)  # a request larger than the whole budget waits for a full one
                if have < need:
                    raise RateLimited(lim.scope, "tpm", lim.tpm, (need - have) * 60.0 / lim.tpm)
            if lim.concurrent:
                leases = self._leases.get(lim.scope, {})
                for lease, expires in list(leases.items()):
                    if expires <= now:
                        del leases[lease]
                if len(leases) >= lim.concurrent:
                    raise RateLimited(lim.scope, "concurrent", lim.concurrent, 1.0)
        lease = f"l{next(self._ids)}"
        for lim in limits:
            for window, rate in ((1.0, lim.rps), (60.0, lim.rpm)):
                if rate:
                    self._logs[(lim.scope, window)].append(now)
            if lim.tpm:
                bucket = self._buckets.get(lim.scope)
                if bucket is None:
                    bucket = self._buckets[lim.scope] = _Bucket(lim.tpm, now)
                bucket.tokens -= tokens
            if lim.concurrent:
                self._leases.setdefault(lim.scope, {})[lease] = now + LEASE_S
        headers = {}
        if limits:
            first = limits[0]
            rate, window = (first.rpm, 60.0) if first.rpm else (first.rps, 1.0)
            log = self._logs.get((first.scope, window)) if rate else None
            remaining = rate - len(log) if rate and log else 0
            reset = log[0] + window - now if log else 0.0
            bucket = self._buckets.get(first.scope)
            headers = limit_headers(first, remaining, reset, bucket.tokens if bucket else 0.0)
        return Ticket(limits, lease, tokens, headers)

    async def acquire(self, limits: tuple[Limit, ...], tokens: int) -> Ticket:
        return self.try_acquire(limits, tokens)

    def settle(self, ticket: Ticket, used_tokens: int | None) -> None:
        for lim in ticket.limits:
            if lim.tpm and used_tokens is not None:
                bucket = self._buckets.get(lim.scope)
                if bucket is not None:
                    bucket.tokens = min(float(lim.tpm), bucket.tokens + ticket.reserved - used_tokens)
            if lim.concurrent:
                self._leases.get(lim.scope, {}).pop(ticket.lease, None)

    async def release(self, ticket: Ticket, used_tokens: int | None) -> None:
        self.settle(ticket, used_tokens)
