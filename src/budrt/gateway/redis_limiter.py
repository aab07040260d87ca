"""The limiter in Redis: one Lua script checks and charges every scope atomically.

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

from budrt.gateway.ratelimit import LEASE_S, Limit, LimiterUnavailable, LocalLimiter, RateLimited, Ticket
from budrt.gateway.ratelimit import limit_headers as _headers
from budrt.gateway.resp import RespClient, RespError, encode_args

log = logging.getLogger("budrt.gateway.ratelimit")

REDIS_ERRORS = Counter(
    "budrt_gateway_ratelimit_redis_errors_total",
    "Rate-limit checks that could not reach Redis, by the policy applied",
    ["policy"],
)
RETRY_REDIS_AFTER_S = 1.0  # after a failure, requests skip Redis this long instead of each timing out
KINDS = ("rps", "rpm", "tpm", "concurrent")

# KEYS: 4 per limit (rps log, rpm log, tpm bucket, concurrency leases).
# ARGV: lease, tokens, lease_us, then 4 numbers per limit (rps, rpm, tpm, concurrent; 0 = none).
# Returns {1, remaining requests, reset us, tokens left} for the first limit, or
# {0, limit index, kind index, limit, retry-after us}.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease, tokens, lease_us = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #KEYS / 4
local have = {}
for i = 0, n - 1 do
  local k, a = i * 4, 3 + i * 4
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
end
local remaining, reset, left0 = 0, 0, 0
for i = 0, n - 1 do
  local k, a = i * 4, 3 + i * 4
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
end
return {1, remaining, reset, tostring(left0)}
"""

# KEYS: 2 per limit (tpm bucket, concurrency leases). ARGV: lease, refund, then tpm per limit.
RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local refund = tonumber(ARGV[2])
for i = 0, #KEYS / 2 - 1 do
  local tpm = tonumber(ARGV[3 + i])
  if tpm > 0 and refund ~= 0 then
    local b = redis.call('HMGET', KEYS[i * 2 + 1], 't', 'at')
    if b[1] then
      local left = math.min(tpm, tonumber(b[1]) + (now - tonumber(b[2])) * tpm / 60000000)
      redis.call('HSET', KEYS[i * 2 + 1], 't', math.min(tpm, left + refund), 'at', now)
    elseif refund < 0 then
      redis.call('HSET', KEYS[i * 2 + 1], 't', tpm + refund, 'at', now)
      redis.call('PEXPIRE', KEYS[i * 2 + 1], 120000)
    end
  end
  redis.call('ZREM', KEYS[i * 2 + 2], ARGV[1])
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

    def _fallback(self, limits: tuple[Limit, ...], tokens: int) -> Ticket:
        if self.fail_mode == "closed":
            raise LimiterUnavailable()
        return self.local.try_acquire(limits, tokens)

    async def acquire(self, limits: tuple[Limit, ...], tokens: int) -> Ticket:
        if not limits:
            return Ticket(limits, "", tokens, {})
        if self._down_until > time.monotonic():
            self._failed(None)
            return self._fallback(limits, tokens)
        self._count += 1
        lease = self._lease_base + str(self._count)
        head, tail = self._packed.get(limits) or self._pack(limits)
        packed = head + encode_args((lease, tokens, int(LEASE_S * 1e6))) + tail
        try:
            res = await self.redis.evalsha_packed(ACQUIRE, packed)
        except (RespError, OSError) as exc:
            self._failed(exc)
            return self._fallback(limits, tokens)
        if res[0] == 0:
            lim = limits[int(res[1])]
            kind = KINDS[int(res[2]) - 1]
            raise RateLimited(lim.scope, kind, int(res[3]), float(res[4]) / 1e6)
        headers = _headers(limits[0], int(res[1]), float(res[2]) / 1e6, float(res[3]))
        return Ticket(limits, lease, tokens, headers, local=False)

    def _pack(self, limits: tuple[Limit, ...]) -> tuple[bytes, bytes]:
        keys: list[str] = []
        args: list[int] = []
        for lim in limits:
            base = self.prefix + lim.scope
            keys += (base + ":s", base + ":m", base + ":t", base + ":c")
            args += (lim.rps or 0, lim.rpm or 0, lim.tpm or 0, lim.concurrent or 0)
        count = 3 + len(keys) + 3 + len(args)  # EVALSHA sha numkeys KEYS lease tokens lease_us ARGS
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
        if not any(lim.concurrent or (lim.tpm and refund) for lim in ticket.limits):
            return  # nothing held: no round trip
        keys: list[str] = []
        args: list[int | str] = [ticket.lease, refund]
        for lim in ticket.limits:
            base = self.prefix + lim.scope
            keys += (base + ":t", base + ":c")
            args.append(lim.tpm or 0)
        try:
            await self.redis.evalsha(self._release_sha, RELEASE, keys, args)
        except (RespError, OSError) as exc:  # the lease expires on its own; tokens stay charged
            self._failed(exc)
