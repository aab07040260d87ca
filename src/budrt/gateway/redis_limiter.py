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
from budrt.gateway.ratelimit import LEASE_S, Limit, LimiterUnavailable, RateLimited, Ticket
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

# KEYS: 5 per limit (rps log, rpm log, tpm bucket, concurrency leases, budget counters).
# ARGV: lease, tokens, lease_us, images, then 8 numbers per limit (rps, rpm, tpm, concurrent,
# tokens/day, tokens/month, images/day, images/month; 0 = none).
# Returns {1, remaining requests, reset us, tokens left, day, month} (the first limit's headers,
# the budget periods charged), or {0, limit index, kind index, limit, retry-after us}.
# Budget counters are one hash per scope: the day and month they count (d, m) and the tokens and
# images used in each; a new period starts from 0, and the hash expires after the period ends.
ACQUIRE = (
    CALENDAR
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
    local b = redis.call('HMGET', KEYS[k + 3], 't', 'at')
    local left = tpm
    if b[1] then left = math.min(tpm, tonumber(b[1]) + (now - tonumber(b[2])) * tpm / 60000000) end
    local need = math.min(tokens, tpm)
    if left < need then return {0, i, 3, tpm, math.ceil((need - left) * 60000000 / tpm)} end
    have[i] = left
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
    if tonumber(b[1]) == day then u[1], u[3] = tonumber(b[3]) or 0, tonumber(b[5]) or 0 end
    if tonumber(b[2]) == month then u[2], u[4] = tonumber(b[4]) or 0, tonumber(b[6]) or 0 end
    if tokens > 0 then
      if td > 0 and u[1] + math.min(tokens, td) > td then return {0, i, 5, td, day_end - now} end
      if tm > 0 and u[2] + math.min(tokens, tm) > tm then return {0, i, 6, tm, month_end - now} end
    end
    if images > 0 then
      if id > 0 and u[3] + images > id then return {0, i, 7, id, day_end - now} end
      if im > 0 and u[4] + images > im then return {0, i, 8, im, month_end - now} end
    end
    used[i] = u
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
  if have[i] then
    redis.call('HSET', KEYS[k + 3], 't', have[i] - tokens, 'at', now)
    redis.call('PEXPIRE', KEYS[k + 3], 120000)
    if i == 0 then left0 = have[i] - tokens end
  end
  if tonumber(ARGV[a + 4]) > 0 then
    redis.call('ZADD', KEYS[k + 4], now + lease_us, lease)
    redis.call('PEXPIRE', KEYS[k + 4], lease_us / 1000 + 1000)
  end
  local u = used[i]
  if u then
    redis.call('HSET', KEYS[k + 5], 'd', day, 'm', month, 'td', u[1] + tokens, 'tm', u[2] + tokens,
      'id', u[3] + images, 'im', u[4] + images)
    -- Kept an hour past the longest period it counts, so a late refund still finds it.
    local ends = (tonumber(ARGV[a + 6]) + tonumber(ARGV[a + 8]) > 0) and month_end or day_end
    redis.call('PEXPIREAT', KEYS[k + 5], math.floor(ends / 1000) + 3600000)
  end
end
return {1, remaining, reset, tostring(left0), day, month}
"""
)

# KEYS: 3 per limit (tpm bucket, concurrency leases, budget counters).
# ARGV: lease, token refund, image refund, day, month, then (tpm, has budget) per limit.
RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local refund, irefund = tonumber(ARGV[2]), tonumber(ARGV[3])
local day, month = tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 0, #KEYS / 3 - 1 do
  local tpm, budget = tonumber(ARGV[6 + i * 2]), tonumber(ARGV[7 + i * 2])
  local k = i * 3
  if tpm > 0 and refund ~= 0 then
    local b = redis.call('HMGET', KEYS[k + 1], 't', 'at')
    if b[1] then
      local left = math.min(tpm, tonumber(b[1]) + (now - tonumber(b[2])) * tpm / 60000000)
      redis.call('HSET', KEYS[k + 1], 't', math.min(tpm, left + refund), 'at', now)
    elseif refund < 0 then
      redis.call('HSET', KEYS[k + 1], 't', tpm + refund, 'at', now)
      redis.call('PEXPIRE', KEYS[k + 1], 120000)
    end
  end
  redis.call('ZREM', KEYS[k + 2], ARGV[1])
  if budget > 0 and (refund ~= 0 or irefund ~= 0) then
    -- Only the periods this request was charged to: after a reset the new period owes nothing.
    local b = redis.call('HMGET', KEYS[k + 3], 'd', 'm', 'td', 'tm', 'id', 'im')
    if tonumber(b[1]) == day then
      redis.call('HSET', KEYS[k + 3], 'td', math.max(0, tonumber(b[3]) - refund),
        'id', math.max(0, tonumber(b[5]) - irefund))
    end
    if tonumber(b[2]) == month then
      redis.call('HSET', KEYS[k + 3], 'tm', math.max(0, tonumber(b[4]) - refund),
        'im', math.max(0, tonumber(b[6]) - irefund))
    end
  end
end
return 1
"""


class RedisLimiter:
    def __init__(self, url: str, fail_mode: str = "open", prefix: str = "budrt:rl:") -> None:
        self.redis = RespClient(url, timeout_s=0.5)
        self.fail_mode = fail_mode
        self.prefix = prefix
        self.local = LocalLimiter()
        self._acquire_sha = hashlib.sha1(ACQUIRE.encode()).hexdigest()
        self._release_sha = hashlib.sha1(RELEASE.encode()).hexdigest()
        self._lease_base = f"{os.getpid()}-{os.urandom(4).hex()}-"
        self._count = 0
        self._down_until = 0.0
        # Encoded EVALSHA prefix and suffix per limits tuple: only the lease and tokens vary.
        self._packed: dict[tuple[Limit, ...], tuple[bytes, bytes]] = {}

    async def close(self) -> None:
        await self.redis.close()

    def _failed(self, exc: BaseException | None) -> None:
        REDIS_ERRORS.labels(self.fail_mode).inc()
        now = time.monotonic()
        if exc is not None:  # logged once per outage window, counted every time
            log.warning(
                "rate-limit store unreachable; failing %s",
                self.fail_mode,
                extra={"fields": {"error": repr(exc)}},
            )
            self._down_until = now + RETRY_REDIS_AFTER_S

    def _fallback(self, limits: tuple[Limit, ...], tokens: int, images: int) -> Ticket:
        if self.fail_mode == "closed":
            raise LimiterUnavailable()
        return self.local.try_acquire(limits, tokens, images)

    async def acquire(self, limits: tuple[Limit, ...], tokens: int, images: int = 0) -> Ticket:
        if not limits:
            return Ticket(limits, "", tokens, {})
        if self._down_until > time.monotonic():
            self._failed(None)
            return self._fallback(limits, tokens, images)
        self._count += 1
        lease = self._lease_base + str(self._count)
        head, tail = self._packed.get(limits) or self._pack(limits)
        packed = head + encode_args((lease, tokens, int(LEASE_S * 1e6), images)) + tail
        try:
            res = await self.redis.evalsha_packed(ACQUIRE, packed)
        except (RespError, OSError) as exc:
            self._failed(exc)
            return self._fallback(limits, tokens, images)
        if res[0] == 0:
            lim = limits[int(res[1])]
            kind = KINDS[int(res[2]) - 1]
            raise RateLimited(lim.scope, kind, int(res[3]), float(res[4]) / 1e6)
        headers = _headers(limits[0], int(res[1]), float(res[2]) / 1e6, float(res[3]))
        return Ticket(
            limits, lease, tokens, headers, local=False, images=images, day=int(res[4]), month=int(res[5])
        )

    def _pack(self, limits: tuple[Limit, ...]) -> tuple[bytes, bytes]:
        keys: list[str] = []
        args: list[int] = []
        for lim in limits:
            base = self.prefix + lim.scope
            keys += (base + ":s", base + ":m", base + ":t", base + ":c", base + ":b")
            args += (lim.rps or 0, lim.rpm or 0, lim.tpm or 0, lim.concurrent or 0)
            args += (lim.tokens_per_day or 0, lim.tokens_per_month or 0)
            args += (lim.images_per_day or 0, lim.images_per_month or 0)
        count = 3 + len(keys) + 4 + len(args)  # EVALSHA sha numkeys KEYS lease tokens lease_us images ARGS
        head = b"*%d\r\n" % count + encode_args(["EVALSHA", self._acquire_sha, len(keys), *keys])
        if len(self._packed) >= 10_000:  # bounded: limits change rarely, keys are many
            self._packed.clear()
        packed = self._packed[limits] = (head, encode_args(args))
        return packed

    async def release(self, ticket: Ticket, used_tokens: int | None) -> None:
        if ticket.local:
            self.local.settle(ticket, used_tokens)
            return
        refund = 0 if used_tokens is None else ticket.reserved - used_tokens
        image_refund = ticket.images if used_tokens == 0 else 0  # 0: nothing was served
        if not any(
            lim.concurrent or (lim.tpm and refund) or (lim.has_budget and (refund or image_refund))
            for lim in ticket.limits
        ):
            return  # nothing held: no round trip
        keys: list[str] = []
        args: list[int | str] = [ticket.lease, refund, image_refund, ticket.day, ticket.month]
        for lim in ticket.limits:
            base = self.prefix + lim.scope
            keys += (base + ":t", base + ":c", base + ":b")
            args += (lim.tpm or 0, 1 if lim.has_budget else 0)
        try:
            await self.redis.evalsha(self._release_sha, RELEASE, keys, args)
        except (RespError, OSError) as exc:  # the lease expires on its own; tokens stay charged
            self._failed(exc)
