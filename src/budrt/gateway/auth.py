"""Bearer-key authentication with a short in-process cache in front of the database."""

from __future__ import annotations

import asyncio
import time

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from budrt.protocol.errors import unauthorized
from budrt.store.keys import KeyRecord, KeyStore

_MAX_CACHED = 10_000  # bounds memory if a client sprays random keys


def extract_key(headers: Headers) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("api-key") or headers.get("x-api-key") or None


class Authenticator:
    """Maps a presented key to its KeyRecord; the DB is read at most once per key per `ttl_s`.

    The TTL is also how long a revocation takes to reach this process.
    """

    def __init__(self, store: KeyStore, ttl_s: float = 1.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._pending: dict[str, asyncio.Future[KeyRecord | None]] = {}

    async def authenticate(self, headers: Headers) -> KeyRecord:
        key = extract_key(headers)
        if not key:
            raise unauthorized("Missing API key. Send it as 'Authorization: Bearer <key>'.")
        record = await self.lookup(key)
        if record is None:
            raise unauthorized("Incorrect API key provided.")
        return record

    async def lookup(self, key: str) -> KeyRecord | None:
        digest = self.store.hash(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            record = hit[1]
            # Expiry is checked on every hit so an expiring key stops at its exact time.
            return record if record is None or record.is_active() else None
        pending = self._pending.get(digest)
        if pending is not None:  # concurrent misses for one key share one DB read
            return await asyncio.shield(pending)
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            record = await run_in_threadpool(self.store.verify, key)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (time.monotonic() + self.ttl_s, record)
            future.set_result(record)
            return record
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._pending[digest]
