"""Response cache over real HTTP: hit, miss, bypass, SSE replay; memory and Redis backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from budrt.config import CacheConfig, DeploymentConfig, Settings
from budrt.gateway.app import create_app
from budrt.gateway.cache import ENTRY_OVERHEAD, MemoryCache, cache_key, cache_tenant
from budrt.security.rbac import Principal
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.mock_upstream import MockUpstream, ServerThread, chat_response
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
    other_key, _ = store.create("other")  # same user: still its own entries by default
    server = ServerThread(create_app(settings, key_store=store)).start()
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    other = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other_key}"}, timeout=10)
    yield client, up, other
    client.close()
    other.close()
    server.stop()
    upstream.stop()
    store.db.dispose()
    if redis:
        redis.stop()


def test_hit_miss_and_bypass(gw: tuple) -> None:
    c, up, _ = gw
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
    c, up, _ = gw
    body = _chat(temperature=0, mock="bad_request")
    assert c.post(CHAT, json=body).status_code == 400
    assert c.post(CHAT, json=body).headers["x-budrt-cache"] == "miss"


def test_stream_replays_as_sse(gw: tuple) -> None:
    c, up, _ = gw
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


def test_entries_are_per_key_by_default(gw: tuple) -> None:
    """A hit would tell one caller what another sent: another key never gets one."""
    c, up, other = gw
    body = _chat(temperature=0, max_tokens=11)
    assert c.post(CHAT, json=body).headers["x-budrt-cache"] == "miss"
    assert c.post(CHAT, json=body).headers["x-budrt-cache"] == "hit"
    before = up.requests
    assert other.post(CHAT, json=body).headers["x-budrt-cache"] == "miss"
    assert up.requests == before + 1
    assert other.post(CHAT, json=body).headers["x-budrt-cache"] == "hit"  # its own entry


def test_memory_cache_is_bounded_in_bytes(tmp_path: Path) -> None:
    up = MockUpstream("up")
    upstream = ServerThread(up.app).start()
    entry = len(chat_response("up", "m")) + ENTRY_OVERHEAD + len("application/json")
    settings = Settings(
        home=tmp_path,
        secret_key="test-secret-test-secret",
        deployments=[DeploymentConfig(model="m", endpoints=[upstream.url + "/v1"])],
        gateway={"cache": {"enabled": True, "max_bytes": 2 * entry + 10, "ttl_s": 60}},
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("k")
    server = ServerThread(create_app(settings, key_store=store)).start()
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:

            def state(n: int) -> str:
                return c.post(CHAT, json=_chat(temperature=0, max_tokens=n)).headers["x-budrt-cache"]

            assert [state(1), state(2), state(1), state(2)] == ["miss", "miss", "hit", "hit"]
            assert state(3) == "miss"  # a third entry does not fit: the least recently used goes
            assert [state(2), state(3), state(1)] == ["hit", "hit", "miss"]
    finally:
        server.stop()
        upstream.stop()
        store.db.dispose()


def test_key_and_lru_units() -> None:
    t = "key:1"
    assert cache_key("/chat/completions", "m", {"temperature": 0.5}, t) is None
    assert cache_key("/embeddings", "m", {"input": "x"}, t) is not None  # embeddings are deterministic
    a = cache_key("/chat/completions", "m", {"temperature": 0, "top_p": 1, "stop": ["x"]}, t)
    b = cache_key("/chat/completions", "m", {"stop": ["x"], "top_p": 1, "temperature": 0}, t)
    assert a == b  # field order does not matter
    assert a != cache_key("/completions", "m", {"temperature": 0, "top_p": 1, "stop": ["x"]}, t)
    assert a != cache_key("/chat/completions", "m", {"temperature": 0, "top_p": 1, "stop": ["x"]}, "key:2")
    # Who shares entries under each scope; narrower when the principal has no user or team.
    p = Principal(kind="key", id=7, name="k", key_id=7, user="ann", team="red")
    lone = Principal(kind="key", id=8, name="k8", key_id=8)
    jwt = Principal(kind="jwt", id="jwt:bob", name="bob", user="bob")
    tenants = {s: (cache_tenant(p, s), cache_tenant(lone, s)) for s in ("key", "user", "team", "global")}
    assert tenants == {
        "key": ("key:7", "key:8"),
        "user": ("user:ann", "key:8"),
        "team": ("team:red", "key:8"),
        "global": ("", ""),
    }
    assert cache_tenant(jwt, "key") == "key:jwt:bob" and cache_tenant(jwt, "team") == "user:bob"

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
        assert await expired.get("x") is None and expired.size == 0
        sized = MemoryCache(CacheConfig(max_bytes=3 * (ENTRY_OVERHEAD + 1 + 100), ttl_s=60))
        for k in "abc":
            await sized.set(k, "t", b"x" * 100)
        await sized.set("a", "t", b"y" * 100)  # replacing an entry does not count it twice
        assert sized.size == 3 * (ENTRY_OVERHEAD + 101) and len(sized._data) == 3
        await sized.set("d", "t", b"x" * 150)  # the least recently used ("b") makes room
        assert await sized.get("b") is None and await sized.get("a") == ("t", b"y" * 100)
        await sized.set("huge", "t", b"x" * 10_000)  # larger than the whole cache: not stored
        assert await sized.get("huge") is None and await sized.get("d") is not None

    asyncio.run(lru())
