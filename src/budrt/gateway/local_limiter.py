"""`LocalLimiter`: the limits of `budrt.gateway.ratelimit` kept in process memory — exact for one
gateway process, and the fail-open fallback when Redis is unreachable."""

from __future__ import annotations

import itertools
import time
from collections import deque
from datetime import UTC, datetime

from starlette.concurrency import run_in_threadpool

from budrt.gateway.ratelimit import (
    LEASE_S,
    Limit,
    RateLimited,
    Seed,
    Ticket,
    charge,
    limit_headers,
    log,
    month_start,
    periods,
)


class _Bucket:
    """A tpm bucket of whole tokens: a refill adds only whole tokens and moves `at` forward by
    just the time they took, so the fraction of a token earned since is kept, not lost."""

    __slots__ = ("tokens", "at")

    def __init__(self, capacity: int, now: float) -> None:
        self.tokens = capacity
        self.at = now

    def refill(self, capacity: int, now: float) -> int:
        tokens = self.tokens
        if tokens >= capacity:  # full (or above a capacity just lowered)
            self.tokens, self.at = capacity, now
            return capacity
        gained = int((now - self.at) * capacity / 60.0)
        if tokens + gained >= capacity:
            self.tokens, self.at = capacity, now
        elif gained > 0:
            self.tokens = tokens + gained
            self.at += gained * 60.0 / capacity
        return self.tokens

    def wait_s(self, capacity: int, need: int, now: float) -> float:
        """Seconds until the bucket (refilled at `now`) holds `need` tokens."""
        return (need - self.tokens) * 60.0 / capacity - (now - self.at)


class _Budget:
    """A scope's tokens and images counted in the current UTC day and month."""

    __slots__ = ("day", "month", "day_tokens", "month_tokens", "day_images", "month_images")

    def __init__(
        self,
        day: int,
        month: int,
        day_tokens: int = 0,
        month_tokens: int = 0,
        day_images: int = 0,
        month_images: int = 0,
    ) -> None:
        self.day, self.month = day, month  # the periods counted (`periods()` ids)
        self.day_tokens, self.month_tokens = day_tokens, month_tokens
        self.day_images, self.month_images = day_images, month_images

    def roll(self, day: int, month: int) -> None:
        """Start from 0 in a period that is not the one counted."""
        if self.day != day:
            self.day, self.day_tokens, self.day_images = day, 0, 0
        if self.month != month:
            self.month, self.month_tokens, self.month_images = month, 0, 0

    def charge(self, tokens: int, images: int) -> None:
        self.day_tokens += tokens
        self.month_tokens += tokens
        self.day_images += images
        self.month_images += images

    def refund(self, day: int, month: int, tokens: int, images: int) -> None:
        """Give back a charge made in `day` and `month`; a period since reset is left alone."""
        if self.day == day:
            self.day_tokens, self.day_images = (
                max(0, self.day_tokens - tokens),
                max(0, self.day_images - images),
            )
        if self.month == month:
            self.month_tokens = max(0, self.month_tokens - tokens)
            self.month_images = max(0, self.month_images - images)


class LocalLimiter:
    """In-process limits: exact for one gateway process (and the fail-open fallback).

    `seed`, when given, is asked once per budget scope for the usage already recorded in the
    current periods, so a restarted gateway does not hand out a spent budget again.
    """

    def __init__(self, seed: Seed | None = None) -> None:
        self._logs: dict[tuple[str, float], deque[float]] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._budgets: dict[str, _Budget] = {}
        self._ids = itertools.count()
        self.seed = seed
        self._calendar_memo = (-1, 0, 0.0, 0.0)  # periods() of the current day: one datetime a day

    def _log(self, scope: str, window: float, now: float) -> deque[float]:
        log = self._logs.get((scope, window))
        if log is None:
            log = self._logs[(scope, window)] = deque()
        cutoff = now - window
        while log and log[0] <= cutoff:
            log.popleft()
        return log

    def _calendar(self, wall: float) -> tuple[int, int, float, float]:
        if int(wall // 86400) != self._calendar_memo[0]:
            self._calendar_memo = periods(wall)
        return self._calendar_memo

    def _budget(self, scope: str, day: int, month: int) -> _Budget:
        """The scope's counters, reset to 0 for a period that has ended."""
        b = self._budgets.get(scope)
        if b is None:
            b = self._budgets[scope] = _Budget(day, month)
        else:
            b.roll(day, month)
        return b

    def try_acquire(self, limits: tuple[Limit, ...], tokens: int, images: int = 0) -> Ticket:
        tokens, images = charge(tokens), charge(images)
        now = time.monotonic()
        day = month = 0
        # Check every scope before changing any, so a refusal costs nothing anywhere.
        for lim in limits:
            for kind, window, rate in (("rps", 1.0, lim.rps), ("rpm", 60.0, lim.rpm)):
                if rate:
                    log = self._log(lim.scope, window, now)
                    if len(log) >= rate:
                        raise RateLimited(lim.scope, kind, rate, log[-rate] + window - now)
            if lim.tpm:
                bucket = self._buckets.get(lim.scope)
                have = bucket.refill(lim.tpm, now) if bucket else lim.tpm
                need = min(tokens, lim.tpm)  # a request larger than the whole budget waits for a full one
                if have < need:
                    assert bucket is not None
                    raise RateLimited(lim.scope, "tpm", lim.tpm, bucket.wait_s(lim.tpm, need, now))
            if lim.concurrent:
                leases = self._leases.get(lim.scope, {})
                for lease, expires in list(leases.items()):
                    if expires <= now:
                        del leases[lease]
                if len(leases) >= lim.concurrent:
                    raise RateLimited(lim.scope, "concurrent", lim.concurrent, 1.0)
            if lim.has_budget:
                wall = time.time()
                day, month, day_end, month_end = self._calendar(wall)
                self._check_budget(
                    lim, self._budget(lim.scope, day, month), tokens, images, wall, day_end, month_end
                )
        lease = f"l{next(self._ids)}"
        for lim in limits:
            for window, rate in ((1.0, lim.rps), (60.0, lim.rpm)):
                if rate:
                    self._logs[(lim.scope, window)].append(now)
            if lim.tpm:
                bucket = self._buckets.get(lim.scope)
                if bucket is None:
                    bucket = self._buckets[lim.scope] = _Bucket(lim.tpm, now)
                bucket.tokens -= min(tokens, lim.tpm)  # at most the whole bucket: never below 0 here
            if lim.concurrent:
                self._leases.setdefault(lim.scope, {})[lease] = now + LEASE_S
            if lim.has_budget:
                self._budgets[lim.scope].charge(tokens, images)
        headers = {}
        if limits:
            first = limits[0]
            rate, window = (first.rpm, 60.0) if first.rpm else (first.rps, 1.0)
            log = self._logs.get((first.scope, window)) if rate else None
            remaining = rate - len(log) if rate and log else 0
            reset = log[0] + window - now if log else 0.0
            bucket = self._buckets.get(first.scope)
            headers = limit_headers(first, remaining, reset, bucket.tokens if bucket else 0)
        return Ticket(limits, lease, tokens, headers, images=images, day=day, month=month)

    @staticmethod
    def _check_budget(
        lim: Limit, b: _Budget, tokens: int, images: int, wall: float, day_end: float, month_end: float
    ) -> None:
        # Like tpm, a reservation larger than the whole budget only needs an unused budget.
        # A request reserving nothing of a kind (no tokens, no images) is not held by its budget.
        if tokens:
            for kind, budget, used, end in (
                ("tokens_per_day", lim.tokens_per_day, b.day_tokens, day_end),
                ("tokens_per_month", lim.tokens_per_month, b.month_tokens, month_end),
            ):
                if budget and used + min(tokens, budget) > budget:
                    raise RateLimited(lim.scope, kind, budget, end - wall)
        if images:
            for kind, budget, used, end in (
                ("images_per_day", lim.images_per_day, b.day_images, day_end),
                ("images_per_month", lim.images_per_month, b.month_images, month_end),
            ):
                if budget and used + images > budget:
                    raise RateLimited(lim.scope, kind, budget, end - wall)

    async def acquire(self, limits: tuple[Limit, ...], tokens: int, images: int = 0) -> Ticket:
        if self.seed is not None:
            for lim in limits:
                if lim.has_budget and lim.scope not in self._budgets:
                    await self._seed(lim.scope)
        return self.try_acquire(limits, tokens, images)

    def forget_budgets(self) -> None:
        """Drop every budget counter: each is loaded again through `seed` on its next use."""
        self._budgets.clear()

    async def _seed(self, scope: str) -> None:
        day, month, _, _ = periods(time.time())
        assert self.seed is not None
        try:
            day_tokens, day_images = await run_in_threadpool(
                self.seed, scope, datetime.fromtimestamp(day * 86400, UTC)
            )
            month_tokens, month_images = await run_in_threadpool(self.seed, scope, month_start(month))
        except Exception as exc:  # the usage store is down: count from zero rather than refuse all
            log.warning("budget usage not loaded", extra={"fields": {"scope": scope, "error": repr(exc)}})
            day_tokens = day_images = month_tokens = month_images = 0
        # setdefault: a request admitted while this one waited on the DB keeps its charge.
        self._budgets.setdefault(
            scope, _Budget(day, month, day_tokens, month_tokens, day_images, month_images)
        )

    def settle(self, ticket: Ticket, used_tokens: int | None) -> None:
        used = charge(used_tokens) if used_tokens is not None else None
        refund = ticket.reserved - used if used is not None else 0
        image_refund = ticket.images if used == 0 else 0  # 0: nothing was served
        for lim in ticket.limits:
            if lim.tpm and used is not None:
                bucket = self._buckets.get(lim.scope)
                if bucket is not None:  # the bucket was charged min(reserved, tpm)
                    back = min(ticket.reserved, lim.tpm) - used
                    bucket.tokens = min(lim.tpm, bucket.tokens + back)
            if lim.concurrent:
                self._leases.get(lim.scope, {}).pop(ticket.lease, None)
            if lim.has_budget and (refund or image_refund):
                b = self._budgets.get(lim.scope)
                if b is not None:
                    b.refund(ticket.day, ticket.month, refund, image_refund)

    async def release(self, ticket: Ticket, used_tokens: int | None) -> None:
        self.settle(ticket, used_tokens)
