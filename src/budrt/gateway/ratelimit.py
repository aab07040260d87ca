"""Rate limits and quotas: requests per second/minute, tokens per minute, concurrent requests,
and budgets per calendar period (tokens and images per day / month, UTC).

A request is checked against a list of `Limit`s (one per scope: key, user, team, model...), all
or nothing. Requests per window use an exact sliding-window log, so no window of that length
ever admits more than the limit; tokens use a token bucket that the caller reserves from before
the call (prompt estimate + max_tokens) and settles with the actual usage after it. Concurrency
is a set of leases that expire, so a crashed gateway cannot leak slots forever. Budgets are
counters per period: tokens are reserved and settled like tpm, images count the request's `n`;
a refused request waits for the period to end (00:00 UTC, or the 1st of the month).

Every counter is an integer, in process and in Redis: what one request is charged (tokens,
images, the usage it settles with) is clamped to 0 ... MAX_CHARGE on entry to a limiter, and a
tpm bucket is charged at most its own capacity, so no request value can overflow a counter,
lose precision in Lua's doubles, or leave a bucket locked.

`budrt.gateway.local_limiter.LocalLimiter` keeps this in process memory;
`budrt.gateway.redis_limiter.RedisLimiter` does the same in one atomic Lua script per call, exact
across every gateway sharing the Redis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

LEASE_S = 600.0  # a concurrency slot not released within this is reclaimed
# The most tokens (or images) one request is charged, whatever it asks for: above any model's
# context x n (reservations are settled with the actual usage anyway), and small enough that
# counters summing millions of such charges stay exact integers in Lua's doubles (< 2**53) and
# far from HINCRBY's int64 overflow.
MAX_CHARGE = 1 << 30
MAX_RETRY_S = 31 * 86400.0  # Retry-After is at most a month (the longest budget period)
BUDGETS = ("tokens_per_day", "tokens_per_month", "images_per_day", "images_per_month")
log = logging.getLogger("budrt.gateway.ratelimit")


@dataclass(frozen=True, slots=True)
class Limit:
    """The limits of one scope, e.g. `Limit("key:12", rpm=60)`; None = unlimited."""

    scope: str
    rpm: int | None = None
    rps: int | None = None
    tpm: int | None = None
    concurrent: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    images_per_day: int | None = None
    images_per_month: int | None = None

    @property
    def has_budget(self) -> bool:
        return bool(
            self.tokens_per_day or self.tokens_per_month or self.images_per_day or self.images_per_month
        )

    @property
    def counts_tokens(self) -> bool:
        return bool(self.tpm or self.tokens_per_day or self.tokens_per_month)


def quota_limit(scope: str, quota: Any) -> Limit | None:
    """The `Limit` of a stored quota (key, user or team: rpm, tpm and budgets); None if empty."""
    if not quota:
        return None
    return Limit(
        scope,
        rpm=quota.rpm,
        tpm=quota.tpm,
        tokens_per_day=quota.tokens_per_day,
        tokens_per_month=quota.tokens_per_month,
        images_per_day=quota.images_per_day,
        images_per_month=quota.images_per_month,
    )


@dataclass(slots=True)
class Ticket:
    """What an admitted request holds until `release`: its reservations and lease."""

    limits: tuple[Limit, ...]
    lease: str
    reserved: int
    headers: dict[str, str]
    local: bool = True  # False: held in Redis
    images: int = 0  # charged to image budgets; refunded when nothing was served
    day: int = 0  # the budget periods charged (a refund after a reset must not touch the new one)
    month: int = 0

    @property
    def settles(self) -> bool:
        """True when release needs the actual token usage (tpm or token budgets, image refunds)."""
        return any(lim.counts_tokens or lim.has_budget for lim in self.limits)


def periods(now: float) -> tuple[int, int, float, float]:
    """(day id, month id, day end, month end) of unix time `now`, in UTC calendar periods.

    Day id: days since the epoch; month id: year * 12 + month - 1 (the Lua script agrees).
    """
    day = int(now // 86400)
    date = datetime.fromtimestamp(day * 86400, UTC)
    month = date.year * 12 + date.month - 1
    year, index = divmod(month + 1, 12)
    month_end = datetime(year, index + 1, 1, tzinfo=UTC).timestamp()
    return day, month, (day + 1) * 86400.0, month_end


def month_start(month: int) -> datetime:
    year, index = divmod(month, 12)
    return datetime(year, index + 1, 1, tzinfo=UTC)


def charge(amount: int) -> int:
    """What a limiter counts for `amount` tokens or images: an int in 0 ... MAX_CHARGE."""
    if amount.__class__ is int and 0 <= amount <= MAX_CHARGE:  # the usual case, kept cheap
        return amount
    if not isinstance(amount, int | float) or amount != amount:  # NaN
        return 0
    return int(min(max(amount, 0), MAX_CHARGE))


class RateLimited(Exception):
    def __init__(self, scope: str, kind: str, limit: int, retry_after_s: float) -> None:
        super().__init__("rate limited")
        self.scope = scope
        self.kind = kind  # "rpm", "rps", "tpm", "concurrent" or one of BUDGETS
        self.limit = limit
        # Finite and bounded: it becomes the Retry-After and x-ratelimit-reset-* headers.
        ok = math.isfinite(retry_after_s)
        self.retry_after_s = min(max(retry_after_s, 0.0), MAX_RETRY_S) if ok else MAX_RETRY_S

    @property
    def code(self) -> str:
        """OpenAI's error codes: a rate limit passes soon, a quota only when its period ends."""
        return "insufficient_quota" if self.kind in BUDGETS else "rate_limit_exceeded"

    def message(self) -> str:
        what = {
            "rpm": "requests per minute",
            "rps": "requests per second",
            "tpm": "tokens per minute",
            "concurrent": "concurrent requests",
            "tokens_per_day": "tokens per day",
            "tokens_per_month": "tokens per month",
            "images_per_day": "images per day",
            "images_per_month": "images per month",
        }[self.kind]
        scope = self.scope.split(":")[0]
        if self.kind in BUDGETS:
            reset = "00:00 UTC" if self.kind.endswith("day") else "00:00 UTC on the 1st of next month"
            return (
                f"You exceeded your current quota: {self.limit} {what} for this {scope}. "
                f"It resets at {reset}."
            )
        return f"Rate limit reached: {self.limit} {what} for this {scope}."

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
    async def acquire(self, limits: tuple[Limit, ...], tokens: int, images: int = 0) -> Ticket: ...

    async def release(self, ticket: Ticket, used_tokens: int | None) -> None: ...


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`."""
    if not seconds < MAX_RETRY_S:  # also NaN
        seconds = MAX_RETRY_S
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


def limit_headers(limit: Limit, remaining_requests: int, reset_requests: float, tokens_left: int) -> dict:
    """`x-ratelimit-*` headers for the first scope (the key), as OpenAI sends them."""
    headers: dict[str, str] = {}
    rate = limit.rpm or limit.rps
    if rate:
        headers["x-ratelimit-limit-requests"] = str(rate)
        headers["x-ratelimit-remaining-requests"] = str(max(0, remaining_requests))
        headers["x-ratelimit-reset-requests"] = duration(reset_requests)
    if limit.tpm:
        headers["x-ratelimit-limit-tokens"] = str(limit.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, tokens_left))
        headers["x-ratelimit-reset-tokens"] = duration(max(0.0, limit.tpm - tokens_left) * 60 / limit.tpm)
    return headers


# What seeds an in-process budget: (tokens, images) used by a scope since a time.
Seed = Callable[[str, datetime], tuple[int, int]]
