"""Response cache for deterministic requests (temperature 0, a `seed`, or embeddings).

The key is a hash of the normalized request: path, canonical model and every other body field
(sorted), minus fields that do not change the output (`user`, `metadata`). A cached stream is
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

log = logging.getLogger("budrt.gateway.cache")

CACHE_LOOKUPS = Counter("budrt_gateway_cache_lookups_total", "Response cache lookups", ["result"])
_IGNORED = frozenset({"user", "metadata", "store"})
SSE = "text/event-stream"
JSON = "application/json"


def cache_key(path: str, model: str, data: dict[str, Any]) -> str | None:
    """None when the request is not deterministic (so must not be cached)."""
    if not path.endswith("/embeddings"):
        seeded = isinstance(data.get("seed"), int)
        temperature = data.get("temperature", 1.0)
        if not seeded and temperature not in (0, 0.0):
            return None
    normal = {k: v for k, v in data.items() if k not in _IGNORED}
    normal["model"] = model
    try:
        blob = orjson.dumps([path, normal], option=orjson.OPT_SORT_KEYS)
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


class MemoryCache:
    """LRU bounded by entry count, with a TTL per entry."""

    def __init__(self, config: CacheConfig) -> None:
        self.ttl_s = config.ttl_s
        self.max_entries = config.max_entries
        self._data: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()

    async def get(self, key: str) -> tuple[str, bytes] | None:
        hit = self._data.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return hit[1], hit[2]

    async def set(self, key: str, content_type: str, body: bytes) -> None:
        self._data[key] = (time.monotonic() + self.ttl_s, content_type, body)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()


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
