"""Response cache for deterministic requests (temperature 0, a `seed`, or embeddings).

The key is a hash of the tenant and the normalized request: path, canonical model and every
other body field (sorted), minus fields that do not change the output (`user`, `metadata`).
The tenant (`cache.scope`: the caller's key by default, or its user, its team, or nobody)
decides who may be answered from whose entries: a hit tells the caller that someone of its
tenant sent the same request before, so by default only the same key. A cached stream is
stored as the exact SSE bytes the upstream sent and replayed as SSE. Entries are only written
for complete 200 responses. `Cache-Control: no-cache` skips the lookup (the fresh answer is
stored); `no-store` skips both.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any

import orjson
from prometheus_client import Counter
from starlette.datastructures import Headers

from budrt.config import CacheConfig
from budrt.security.rbac import Principal

log = logging.getLogger("budrt.gateway.cache")

CACHE_LOOKUPS = Counter("budrt_gateway_cache_lookups_total", "Response cache lookups", ["result"])
_IGNORED = frozenset({"user", "metadata", "store"})
SSE = "text/event-stream"
JSON = "application/json"


def cache_tenant(principal: Principal, scope: str) -> str:
    """Whose entries `principal` shares under `scope`; narrower when it has no user or team
    (a JWT's id is its user's, so "key" is per user for JWTs)."""
    if scope == "global":
        return ""
    if scope == "team" and principal.team:
        return f"team:{principal.team}"
    if scope in ("team", "user") and principal.user:
        return f"user:{principal.user}"
    return f"key:{principal.id}"


def cache_key(path: str, model: str, data: dict[str, Any], tenant: str) -> str | None:
    """None when the request is not deterministic (so must not be cached)."""
    if not path.endswith("/embeddings"):
        seeded = isinstance(data.get("seed"), int)
        temperature = data.get("temperature", 1.0)
        if not seeded and temperature not in (0, 0.0):
            return None
    normal = {k: v for k, v in data.items() if k not in _IGNORED}
    normal["model"] = model
    try:
        blob = orjson.dumps([tenant, path, normal], option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    return hashlib.sha256(blob).hexdigest()


def cache_control(headers: Headers) -> tuple[bool, bool]:
    """(read, write) allowed by the client's Cache-Control."""
    value = headers.get("cache-control", "").lower()
    if not value:
        return True, True
    directives = {d.strip() for d in value.split(",")}
    if "no-store" in directives:
        return False, False
    return "no-cache" not in directives, True


ENTRY_OVERHEAD = 200  # bytes an entry costs besides its body: key, tuple, dict slot


class MemoryCache:
    """LRU bounded by entry count and by bytes (`max_bytes`), with a TTL per entry."""

    def __init__(self, config: CacheConfig) -> None:
        self.ttl_s = config.ttl_s
        self.max_entries = config.max_entries
        self.max_bytes = config.max_bytes
        self.size = 0  # bytes held, as `_cost` counts them
        self._data: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()

    @staticmethod
    def _cost(content_type: str, body: bytes) -> int:
        return ENTRY_OVERHEAD + len(content_type) + len(body)

    def _drop(self, key: str) -> None:
        _, content_type, body = self._data.pop(key)
        self.size -= self._cost(content_type, body)

    async def get(self, key: str) -> tuple[str, bytes] | None:
        hit = self._data.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return hit[1], hit[2]

    async def set(self, key: str, content_type: str, body: bytes) -> None:
        cost = self._cost(content_type, body)
        if cost > self.max_bytes:
            return
        if key in self._data:
            self._drop(key)
        self._data[key] = (time.monotonic() + self.ttl_s, content_type, body)
        self.size += cost
        while len(self._data) > self.max_entries or self.size > self.max_bytes:
            self._drop(next(iter(self._data)))  # the least recently used

    async def close(self) -> None:
        self._data.clear()
        self.size = 0


class RedisCache:
    """Shared by every gateway on the Redis; an unreachable Redis is a miss, never an error."""

    def __init__(self, url: str, config: CacheConfig, prefix: str = "budrt:cache:") -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.ttl_ms = max(1, int(config.ttl_s * 1000))
        self.prefix = prefix

    async def get(self, key: str) -> tuple[str, bytes] | None:
        try:
            raw = await self.redis.get(self.prefix + key)
        except Exception as exc:  # noqa: BLE001 - any store failure is a miss
            log.warning("cache read failed", extra={"fields": {"error": repr(exc)}})
            return None
        if raw is None:
            return None
        content_type, _, body = bytes(raw).partition(b"\n")
        return content_type.decode(), body

    async def set(self, key: str, content_type: str, body: bytes) -> None:
        try:
            await self.redis.set(self.prefix + key, content_type.encode() + b"\n" + body, px=self.ttl_ms)
        except Exception as exc:  # noqa: BLE001
            log.warning("cache write failed", extra={"fields": {"error": repr(exc)}})

    async def close(self) -> None:
        await self.redis.aclose()


ResponseCache = MemoryCache | RedisCache


def make_cache(config: CacheConfig, redis_url: str | None) -> ResponseCache | None:
    if not config.enabled:
        return None
    if config.backend == "redis":
        if not redis_url:
            raise ValueError("gateway.cache.backend 'redis' needs gateway.redis_url")
        return RedisCache(redis_url, config)
    return MemoryCache(config)
