"""The limiter in Redis: one Lua script checks and charges every scope atomically.

Every scope of a request (key, user, team, model) and every kind (rates, tpm, concurrency,
budgets per day and month) is checked in the same script call, then all are charged.

Redis runs a script alone, so two gateways can never both take the last slot of a window: the
limits hold across all gateway processes sharing the Redis. Time comes from the Redis server
(`TIME`), so gateway clocks need not agree. If Redis is unreachable the configured policy
applies: fail-open admits through a per-process `LocalLimiter`, fail-closed refuses with 503.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

from prometheus_client import Counter

from budrt.gateway.local_limiter import LocalLimiter
from budrt.gateway.ratelimit import LEASE_S, Limit, LimiterUnavailable, RateLimited, Seed, Ticket, charge
from budrt.gateway.ratelimit import limit_headers as _headers
from budrt.gateway.resp import RespClient, RespError, encode_args

log = logging.getLogger("budrt.gateway.ratelimit")

REDIS_ERRORS = Counter(
    "budrt_gateway_ratelimit_redis_errors_total",
    "Rate-limit checks that could not reach Redis, by the policy applied",
    ["policy"],
)
RETRY_REDIS_AFTER_S = 1.0  # after a failure, requests skip Redis this long instead of each timing out
KINDS = (
    "rps",
    "rpm",
    "tpm",
    "concurrent",
    "tokens_per_day",
    "tokens_per_month",
    "images_per_day",
    "images_per_month",
)

# The UTC calendar from Redis's clock: (day id, month id, day end us, month end us), the ids as
# `budrt.gateway.ratelimit.periods` numbers them. Civil-from-days (proleptic Gregorian).
CALENDAR = """
local function calendar(now)
  local days = math.floor(now / 86400000000)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)
  yoe = math.floor(yoe / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  local dim = ({31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31})[m]
  if m == 2 and y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) then dim = 29 end
  return days, y * 12 + m - 1, (days + 1) * 86400000000, (days - d + 1 + dim) * 86400000000
end
"""

# Integer counters. A tpm bucket holds whole tokens: a refill adds whole tokens only and moves
# `at` forward by just the time they took (the fraction earned since is kept, not rounded away);
# the key lives until the bucket would be full again. Budget counters change by HINCRBY only.
# Every number here is an integer below 2^53 (charges are clamped to MAX_CHARGE in Python), so
# Lua's doubles hold them exactly; refill's products are exact while tpm < 1.5e8 tokens.
COUNTERS = """
local function refill(key, tpm, now)
  local b = redis.call('HMGET', key, 't', 'at')
  local t, at = tonumber(b[1]), tonumber(b[2])
  if not t or not at or t >= tpm then return tpm, now end
  local gained = math.floor((now - at) * tpm / 60000000)
  if gained <= 0 then return t, at end
  if t + gained >= tpm then return tpm, now end
  return t + gained, at + math.ceil(gained * 60000000 / tpm)
end
local function store(key, tpm, t, at)
  redis.call('HSET', key, 't', t, 'at', at)
  redis.call('PEXPIRE', key, 60000 + math.ceil((tpm - t) * 60000 / tpm))
end
-- A budget counter as read; nil when its text is not an integer HINCRBY takes (a float an older
-- version of this script wrote), so the caller rewrites it.
local function count(v)
  if not v then return 0 end
  if #v < 16 and string.find(v, '^%d+$') then return tonumber(v) end
  return nil
end
local function add(key, field, by)
  if redis.call('HINCRBY', key, field, by) < 0 then redis.call('HSET', key, field, 0) end
end
"""

# KEYS: 5 per limit (rps log, rpm log, tpm bucket, concurrency leases, budget counters).
# ARGV: lease, tokens, lease_us, images, then 8 numbers per limit (rps, rpm, tpm, concurrent,
# tokens/day, tokens/month, images/day, images/month; 0 = none).
# Returns {1, remaining requests, reset us, tokens left, day, month} (the first limit's headers,
# the budget periods charged), or {0, limit index, kind index, limit, retry-after us}.
# Budget counters are one hash per scope: the day and month they count (d, m) and the tokens and
# images used in each; a new period starts from 0, and the hash expires after the period ends.
ACQUIRE = (
    CALENDAR
    + COUNTERS
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease, tokens, lease_us = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local images = tonumber(ARGV[4])
local n = #KEYS / 5
local have, used = {}, {}
local day, month, day_end, month_end = 0, 0, 0, 0
for i = 0, n - 1 do
  local k, a = i * 5, 4 + i * 8
  for j, window in ipairs({1000000, 60000000}) do
    local rate = tonumber(ARGV[a + j])
    if rate > 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[k + j], '-inf', now - window)
      if redis.call('ZCARD', KEYS[k + j]) >= rate then
        local oldest = redis.call('ZRANGE', KEYS[k + j], -rate, -rate, 'WITHSCORES')
        return {0, i, j, rate, tonumber(oldest[2]) + window - now}
      end
    end
  end
  local tpm = tonumber(ARGV[a + 3])
  if tpm > 0 then
    local left, at = refill(KEYS[k + 3], tpm, now)
    local need = math.min(tokens, tpm)  -- also what is charged: the bucket never goes below 0 here
    if left < need then
      return {0, i, 3, tpm, math.ceil((need - left) * 60000000 / tpm) - (now - at)}
    end
    have[i] = {left - need, at}
  end
  local conc = tonumber(ARGV[a + 4])
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 4], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 4]) >= conc then return {0, i, 4, conc, 1000000} end
  end
  local td, tm = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local id, im = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
  if td + tm + id + im > 0 then
    if day == 0 then day, month, day_end, month_end = calendar(now) end
    local b = redis.call('HMGET', KEYS[k + 5], 'd', 'm', 'td', 'tm', 'id', 'im')
    local u = {0, 0, 0, 0}
    if tonumber(b[1]) == day then u[1], u[3] = count(b[3]), count(b[5]) end
    if tonumber(b[2]) == month then u[2], u[4] = count(b[4]), count(b[6]) end
    -- Rewritten before counting on: a new period, or a counter HINCRBY cannot take.
    local rewrite = tonumber(b[1]) ~= day or tonumber(b[2]) ~= month
    for j = 1, 4 do
      if not u[j] then
        u[j], rewrite = math.max(0, math.min(math.floor(tonumber(b[j + 2]) or 0), 2^53)), true
      end
    end
    if tokens > 0 then
      if td > 0 and u[1] + math.min(tokens, td) > td then return {0, i, 5, td, day_end - now} end
      if tm > 0 and u[2] + math.min(tokens, tm) > tm then return {0, i, 6, tm, month_end - now} end
    end
    if images > 0 then
      if id > 0 and u[3] + images > id then return {0, i, 7, id, day_end - now} end
      if im > 0 and u[4] + images > im then return {0, i, 8, im, month_end - now} end
    end
    if rewrite then used[i] = u else used[i] = false end
  end
end
local remaining, reset, left0 = 0, 0, 0
for i = 0, n - 1 do
  local k, a = i * 5, 4 + i * 8
  for j, window in ipairs({1000000, 60000000}) do
    local rate = tonumber(ARGV[a + j])
    if rate > 0 then
      redis.call('ZADD', KEYS[k + j], now, lease)
      redis.call('PEXPIRE', KEYS[k + j], window / 1000 + 1000)
      if i == 0 then
        remaining = rate - redis.call('ZCARD', KEYS[k + j])
        local first = redis.call('ZRANGE', KEYS[k + j], 0, 0, 'WITHSCORES')
        reset = tonumber(first[2]) + window - now
      end
    end
  end
  local h = have[i]
  if h then
    store(KEYS[k + 3], tonumber(ARGV[a + 3]), h[1], h[2])
    if i == 0 then left0 = h[1] end
  end
  if tonumber(ARGV[a + 4]) > 0 then
    redis.call('ZADD', KEYS[k + 4], now + lease_us, lease)
    redis.call('PEXPIRE', KEYS[k + 4], lease_us / 1000 + 1000)
  end
  local u = used[i]
  if u ~= nil then
    local key = KEYS[k + 5]
    if u then
      redis.call('HSET', key, 'd', day, 'm', month, 'td', u[1], 'tm', u[2], 'id', u[3], 'im', u[4])
    end
    if tokens > 0 then
      redis.call('HINCRBY', key, 'td', ARGV[2])
      redis.call('HINCRBY', key, 'tm', ARGV[2])
    end
    if images > 0 then
      redis.call('HINCRBY', key, 'id', ARGV[4])
      redis.call('HINCRBY', key, 'im', ARGV[4])
    end
    -- Kept an hour past the longest period it counts, so a late refund still finds it.
    local ends = (tonumber(ARGV[a + 6]) + tonumber(ARGV[a + 8]) > 0) and month_end or day_end
    redis.call('PEXPIREAT', key, math.floor(ends / 1000) + 3600000)
  end
end
return {1, remaining, reset, left0, day, month}
"""
)

# KEYS: 3 per limit (tpm bucket, concurrency leases, budget counters).
# ARGV: lease, tokens reserved, tokens used (-1: unknown, nothing comes back), image refund, day,
# month, then (tpm, has budget) per limit. A bucket gets back what it was charged,
# min(reserved, tpm), less the usage; budgets get back the reservation less the usage.
RELEASE = (
    COUNTERS
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local reserved, spent, irefund = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local day, month = tonumber(ARGV[5]), tonumber(ARGV[6])
local refund = spent >= 0 and reserved - spent or 0
for i = 0, #KEYS / 3 - 1 do
  local tpm, budget = tonumber(ARGV[7 + i * 2]), tonumber(ARGV[8 + i * 2])
  local k = i * 3
  if tpm > 0 and spent >= 0 and math.min(reserved, tpm) ~= spent then
    local left, at = refill(KEYS[k + 1], tpm, now)
    store(KEYS[k + 1], tpm, math.min(tpm, left + math.min(reserved, tpm) - spent), at)
  end
  redis.call('ZREM', KEYS[k + 2], ARGV[1])
  if budget > 0 and (refund ~= 0 or irefund ~= 0) then
    -- Only the periods this request was charged to: after a reset the new period owes nothing.
    local b = redis.call('HMGET', KEYS[k + 3], 'd', 'm')
    if tonumber(b[1]) == day then
      if refund ~= 0 then add(KEYS[k + 3], 'td', -refund) end
      if irefund ~= 0 then add(KEYS[k + 3], 'id', -irefund) end
    end
    if tonumber(b[2]) == month then
      if refund ~= 0 then add(KEYS[k + 3], 'tm', -refund) end
      if irefund ~= 0 then add(KEYS[k + 3], 'im', -irefund) end
    end
  end
end
return 1
"""
)


def _lua_int(limit: int | None) -> int:
    """A limit as the scripts take it: 0 for none; above 2^53 (no real limit) it is 2^53 - 1,
    so Lua's doubles hold it exactly and replies derived from it fit Redis integers."""
    return min(limit or 0, (1 << 53) - 1)


class RedisLimiter:
    """Limits in Redis. When Redis is unreachable, `fail_mode` "open" admits through `local`, a
    per-process LocalLimiter whose budgets are seeded from the usage records (`seed`, reloaded
    for each outage), except that requests charged to a budget follow `budget_fail_mode`:
    "closed" refuses them (503), since N gateways each admitting up to a budget's rest (and
    usage not yet metered) could overspend it; "open" admits them within the seeded budgets."""

    def __init__(
        self,
        url: str,
        fail_mode: str = "open",
        prefix: str = "budrt:rl:",
        *,
        seed: Seed | None = None,
        budget_fail_mode: str = "closed",
    ) -> None:
        self.redis = RespClient(url, timeout_s=0.5)
        self.fail_mode = fail_mode
        self.budget_fail_mode = budget_fail_mode
        self.prefix = prefix
        self.local = LocalLimiter(seed)
        self._acquire_sha = hashlib.sha1(ACQUIRE.encode()).hexdigest()
        self._release_sha = hashlib.sha1(RELEASE.encode()).hexdigest()
        self._lease_base = f"{os.getpid()}-{os.urandom(4).hex()}-"
        self._count = 0
        self._down_until = 0.0
        self._outage = False  # since the last failure, no call reached Redis
        # Encoded EVALSHA prefix and suffix per limits tuple: only the lease and tokens vary.
        self._packed: dict[tuple[Limit, ...], tuple[bytes, bytes]] = {}

    async def close(self) -> None:
        await self.redis.close()

    def _failed(self, exc: BaseException) -> None:
        log.warning(
            "rate-limit store unreachable; failing %s",
            self.fail_mode,
            extra={"fields": {"error": repr(exc)}},
        )
        self._down_until = time.monotonic() + RETRY_REDIS_AFTER_S
        if not self._outage:
            # A new outage: the fallback's budgets are loaded afresh from the usage records,
            # which now include what Redis admitted since the last one.
            self._outage = True
            self.local.forget_budgets()

    async def _fallback(self, limits: tuple[Limit, ...], tokens: int, images: int) -> Ticket:
        closed = self.fail_mode == "closed" or (
            self.budget_fail_mode == "closed" and any(lim.has_budget for lim in limits)
        )
        REDIS_ERRORS.labels("closed" if closed else "open").inc()
        if closed:
            raise LimiterUnavailable()
        return await self.local.acquire(limits, tokens, images)

    async def acquire(self, limits: tuple[Limit, ...], tokens: int, images: int = 0) -> Ticket:
        if not limits:
            return Ticket(limits, "", tokens, {})
        tokens, images = charge(tokens), charge(images)
        if self._down_until > time.monotonic():
            return await self._fallback(limits, tokens, images)
        self._count += 1
        lease = self._lease_base + str(self._count)
        head, tail = self._packed.get(limits) or self._pack(limits)
        packed = head + encode_args((lease, tokens, int(LEASE_S * 1e6), images)) + tail
        try:
            res = await self.redis.evalsha_packed(ACQUIRE, packed)
        except (RespError, OSError) as exc:
            self._failed(exc)
            return await self._fallback(limits, tokens, images)
        if self._outage:
            self._outage = False
        if res[0] == 0:
            lim = limits[int(res[1])]
            kind = KINDS[int(res[2]) - 1]
            raise RateLimited(lim.scope, kind, int(res[3]), int(res[4]) / 1e6)
        headers = _headers(limits[0], int(res[1]), int(res[2]) / 1e6, int(res[3]))
        return Ticket(
            limits, lease, tokens, headers, local=False, images=images, day=int(res[4]), month=int(res[5])
        )

    def _pack(self, limits: tuple[Limit, ...]) -> tuple[bytes, bytes]:
        keys: list[str] = []
        args: list[int | None] = []
        for lim in limits:
            base = self.prefix + lim.scope
            keys += (base + ":s", base + ":m", base + ":t", base + ":c", base + ":b")
            args += (lim.rps, lim.rpm, lim.tpm, lim.concurrent, lim.tokens_per_day, lim.tokens_per_month)
            args += (lim.images_per_day, lim.images_per_month)
        lua_args = [_lua_int(v) for v in args]
        count = 3 + len(keys) + 4 + len(args)  # EVALSHA sha numkeys KEYS lease tokens lease_us images ARGS
        head = b"*%d\r\n" % count + encode_args(["EVALSHA", self._acquire_sha, len(keys), *keys])
        if len(self._packed) >= 10_000:  # bounded: limits change rarely, keys are many
            self._packed.clear()
        packed = self._packed[limits] = (head, encode_args(lua_args))
        return packed

    async def release(self, ticket: Ticket, used_tokens: int | None) -> None:
        if ticket.local:
            self.local.settle(ticket, used_tokens)
            return
        reserved = ticket.reserved
        used = -1 if used_tokens is None else charge(used_tokens)  # -1: unknown, keep the charge
        refund = 0 if used < 0 else reserved - used
        image_refund = ticket.images if used == 0 else 0  # 0: nothing was served
        if not any(
            lim.concurrent
            or (lim.tpm and used >= 0 and min(reserved, lim.tpm) != used)
            or (lim.has_budget and (refund or image_refund))
            for lim in ticket.limits
        ):
            return  # nothing held: no round trip
        keys: list[str] = []
        args: list[int | str] = [ticket.lease, reserved, used, image_refund, ticket.day, ticket.month]
        for lim in ticket.limits:
            base = self.prefix + lim.scope
            keys += (base + ":t", base + ":c", base + ":b")
            args += (_lua_int(lim.tpm), 1 if lim.has_budget else 0)
        try:
            await self.redis.evalsha(self._release_sha, RELEASE, keys, args)
        except (RespError, OSError) as exc:  # the lease expires on its own; tokens stay charged
            self._failed(exc)
