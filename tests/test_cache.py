"""Response cache over real HTTP: hit, miss, bypass, SSE replay; memory and Redis backends."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from budrt.config import CacheConfig, DeploymentConfig, Settings
from budrt.gateway.app import create_app
from budrt.gateway.cache import MemoryCache, cache_key
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.mock_upstream import MockUpstream, ServerThread
from tests.procs import RedisServer

CHAT = "/v1/chat/completions"


def _chat(**extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.fixture(scope="module", params=["memory", "redis"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    redis = RedisServer().start() if request.param == "redis" else None
    up = MockUpstream("up")
    upstream = ServerThread(up.app).start()
    settings = Settings(
        home=tmp_path_factory.mktemp("cache"),
        secret_key="test-secret-test-secret",
        deployments=[DeploymentConfig(model="m", endpoints=[upstream.url + "/v1"], aliases=["alias"])],
        gateway={
            "redis_url": redis.url if redis else None,
            "cache": {"enabled": True, "backend": request.param, "ttl_s": 60},
        },
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("k")
    server = ServerThread(create_app(settings, key_store=store)).start()
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    yield client, up
    client.close()
    server.stop()
    upstream.stop()
    store.engine.dispose()
    if redis:
        redis.stop()


def test_hit_miss_and_bypass(gw: tuple) -> None:
    c, up = gw
    body = _chat(temperature=0, max_tokens=5)
    before = up.requests
    first = c.post(CHAT, json=body)
    assert first.status_code == 200 and first.headers["x-budrt-cache"] == "miss"
    second = c.post(CHAT, json=body)
    assert second.headers["x-budrt-cache"] == "hit" and second.content == first.content
    assert up.requests == before + 1  # the hit never reached the upstream
    # The alias is the same model; `user` does not change the answer: both hit.
    assert c.post(CHAT, json={**body, "model": "alias", "user": "u"}).headers["x-budrt-cache"] == "hit"
    # Any other sampling parameter is a different entry.
    assert c.post(CHAT, json={**body, "max_tokens": 6}).headers["x-budrt-cache"] == "miss"
    # Bypass: no-cache goes upstream (and refreshes the entry).
    resp = c.post(CHAT, json=body, headers={"Cache-Control": "no-cache"})
    assert resp.headers["x-budrt-cache"] == "miss" and up.requests == before + 3
    # Non-deterministic requests are never cached and carry no cache header.
    for _ in range(2):
        assert "x-budrt-cache" not in c.post(CHAT, json=_chat(temperature=0.7)).headers
    # A seed makes sampling deterministic: cacheable.
    c.post(CHAT, json=_chat(temperature=0.7, seed=3))
    assert c.post(CHAT, json=_chat(temperature=0.7, seed=3)).headers["x-budrt-cache"] == "hit"


def test_errors_are_not_cached(gw: tuple) -> None:
    c, up = gw
    body = _chat(temperature=0, mock="bad_request")
    assert c.post(CHAT, json=body).status_code == 400
    assert c.post(CHAT, json=body).headers["x-budrt-cache"] == "miss"


def test_stream_replays_as_sse(gw: tuple) -> None:
    c, up = gw
    body = _chat(temperature=0, stream=True, mock_chunks=4)
    with c.stream("POST", CHAT, json=body) as resp:
        assert resp.headers["x-budrt-cache"] == "miss"
        original = b"".join(resp.iter_raw())
    before = up.requests
    with c.stream("POST", CHAT, json=body) as resp:
        assert resp.headers["x-budrt-cache"] == "hit"
        assert resp.headers["content-type"].startswith("text/event-stream")
        replay = b"".join(resp.iter_raw())
    assert replay == original and replay.endswith(b"data: [DONE]\n\n")
    assert up.requests == before
    # The non-streaming form of the same request is a different entry.
    assert c.post(CHAT, json={**body, "stream": False}).headers["x-budrt-cache"] == "miss"


def test_key_and_lru_units() -> None:
    assert cache_key("/chat/completions", "m", {"temperature": 0.5}) is None
    assert cache_key("/embeddings", "m", {"input": "x"}) is not None  # embeddings are deterministic
    a = cache_key("/chat/completions", "m", {"temperature": 0, "top_p": 1, "stop": ["x"]})
    b = cache_key("/chat/completions", "m", {"stop": ["x"], "top_p": 1, "temperature": 0})
    assert a == b  # field order does not matter
    assert a != cache_key("/completions", "m", {"temperature": 0, "top_p": 1, "stop": ["x"]})

    import asyncio

    async def lru() -> None:
        cache = MemoryCache(CacheConfig(max_entries=2, ttl_s=60))
        await cache.set("a", "t", b"1")
        await cache.set("b", "t", b"2")
        assert await cache.get("a") == ("t", b"1")  # a is now the most recent
        await cache.set("c", "t", b"3")
        assert await cache.get("b") is None and await cache.get("a") is not None
        expired = MemoryCache(CacheConfig(ttl_s=0))
        await expired.set("x", "t", b"1")
        assert await expired.get("x") is None

    asyncio.run(lru())
