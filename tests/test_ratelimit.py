"""Rate limits: the in-process limiter, the Redis limiter against a real redis-server, and two
real gateway processes sharing one key's limit through Redis."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from budrt.config import DeploymentConfig, Settings
from budrt.gateway.app import create_app
from budrt.gateway.local_limiter import LocalLimiter
from budrt.gateway.ratelimit import Limit, LimiterUnavailable, RateLimited, periods
from budrt.gateway.redis_limiter import CALENDAR, RedisLimiter
from budrt.gateway.resp import RespClient
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.mock_upstream import MockUpstream, ServerThread, free_port
from tests.procs import RedisServer, start_gateway, stop

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ServerThread(MockUpstream("up").app).start()
    yield server.url + "/v1"
    server.stop()


def _settings(home: Path, upstream: str, **gateway: object) -> Settings:
    return Settings(
        home=home,
        secret_key="test-secret-test-secret",
        deployments=[DeploymentConfig(model="m", endpoints=[upstream])],
        gateway=gateway,
    )


async def _exercise(limiter: LocalLimiter | RedisLimiter, tag: str) -> None:
    """The same contract for both limiters."""
    rpm = (Limit(f"{tag}:rpm", rpm=3),)
    for _ in range(3):
        await limiter.acquire(rpm, 1)
    with pytest.raises(RateLimited) as exc:
        await limiter.acquire(rpm, 1)
    assert exc.value.kind == "rpm" and 50 < exc.value.retry_after_s <= 60

    # Tokens: reserved before the call, the unused part refunded after it.
    tpm = (Limit(f"{tag}:tpm", tpm=100),)
    ticket = await limiter.acquire(tpm, 80)
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "20"
    with pytest.raises(RateLimited) as exc:
        await limiter.acquire(tpm, 50)
    assert exc.value.kind == "tpm" and exc.value.headers()["x-ratelimit-limit-tokens"] == "100"
    await limiter.release(ticket, 10)  # actual usage 10: 70 tokens come back
    ticket = await limiter.acquire(tpm, 50)
    assert 40 <= int(ticket.headers["x-ratelimit-remaining-tokens"]) <= 41

    # Concurrency: a slot comes back on release.
    conc = (Limit(f"{tag}:conc", concurrent=2),)
    held = [await limiter.acquire(conc, 0) for _ in range(2)]
    with pytest.raises(RateLimited):
        await limiter.acquire(conc, 0)
    await limiter.release(held[0], None)
    await limiter.acquire(conc, 0)

    # All or nothing across scopes: refused by the second, nothing charged on the first.
    both = (Limit(f"{tag}:a", rpm=5), Limit(f"{tag}:b", rpm=1))
    await limiter.acquire(both, 0)
    with pytest.raises(RateLimited) as exc:
        await limiter.acquire(both, 0)
    assert exc.value.scope == f"{tag}:b"
    ticket = await limiter.acquire((Limit(f"{tag}:a", rpm=5),), 0)
    assert ticket.headers["x-ratelimit-remaining-requests"] == "3"

    # Budgets per period: tokens reserved and settled like tpm; refused until the period ends.
    day_end = periods(time.time())[2]
    budget = (Limit(f"{tag}:budget", tokens_per_day=100, tokens_per_month=1000),)
    ticket = await limiter.acquire(budget, 80)
    with pytest.raises(RateLimited) as exc:
        await limiter.acquire(budget, 30)
    assert exc.value.kind == "tokens_per_day" and exc.value.code == "insufficient_quota"
    assert abs(exc.value.retry_after_s - (day_end - time.time())) < 2
    await limiter.release(ticket, 10)  # 70 come back
    await limiter.acquire(budget, 30)
    images = (Limit(f"{tag}:images", images_per_month=3),)
    ticket = await limiter.acquire(images, 0, images=2)
    with pytest.raises(RateLimited) as exc:
        await limiter.acquire(images, 0, images=2)
    assert exc.value.kind == "images_per_month" and "quota" in exc.value.message()
    await limiter.release(ticket, 0)  # nothing was served: both images come back
    await limiter.acquire(images, 0, images=3)


def test_local_limiter() -> None:
    asyncio.run(_exercise(LocalLimiter(), "local"))


def test_redis_limiter(redis_server: RedisServer) -> None:
    async def run() -> None:
        limiter = RedisLimiter(redis_server.url)
        try:
            await _exercise(limiter, "redis")
            # Per-second limits too.
            rps = (Limit("redis:rps", rps=2),)
            await limiter.acquire(rps, 0)
            await limiter.acquire(rps, 0)
            with pytest.raises(RateLimited) as exc:
                await limiter.acquire(rps, 0)
            assert exc.value.kind == "rps" and exc.value.retry_after_s <= 1
            # Every decision above came from Redis, none from the fail-open fallback.
            assert not limiter.local._logs and not limiter.local._buckets and not limiter.local._budgets
        finally:
            await limiter.close()

    asyncio.run(run())


def test_redis_down_fail_open_and_closed() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"

    async def run() -> None:
        open_, closed = RedisLimiter(dead, "open"), RedisLimiter(dead, "closed")
        limit = (Limit("k", rpm=2),)
        try:
            for _ in range(2):
                await open_.acquire(limit, 0)  # admitted by the local fallback...
            with pytest.raises(RateLimited):
                await open_.acquire(limit, 0)  # ...which still enforces the limit per process
            with pytest.raises(LimiterUnavailable):
                await closed.acquire(limit, 0)
        finally:
            await open_.close()
            await closed.close()

    asyncio.run(run())


def test_gateway_fail_closed_is_503(tmp_path: Path, upstream: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = _settings(tmp_path, upstream, redis_url=dead, ratelimit={"fail_mode": "closed"})
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("k", rpm=10)
    unlimited, _ = store.create("free")
    server = ServerThread(create_app(settings, key_store=store)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            resp = c.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "rate_limiter_unavailable"
            assert resp.headers["retry-after"] == "1"
            # A key without limits never needs Redis.
            assert (
                c.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {unlimited}"}).status_code == 200
            )
            metrics = c.get("/metrics").text
        assert 'budrt_gateway_ratelimit_redis_errors_total{policy="closed"}' in metrics
    finally:
        server.stop()
        store.db.dispose()


def test_two_gateway_processes_share_one_limit(
    tmp_path: Path, redis_server: RedisServer, upstream: str
) -> None:
    settings = _settings(tmp_path, upstream, redis_url=redis_server.url)
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("shared", rpm=60, tpm=100_000)
    gateways = [start_gateway(settings, tmp_path / f"runtime{i}.json") for i in range(2)]
    try:
        headers = {"Authorization": f"Bearer {key}"}
        # A new connection per request: no keep-alive reuse racing the server's idle close.
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        clients = [
            httpx.Client(base_url=url, headers=headers, timeout=30, limits=no_reuse) for _, url in gateways
        ]

        def one(i: int) -> httpx.Response:
            return clients[i % 2].post(CHAT, json=BODY)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(one, range(200)))
        for c in clients:
            c.close()
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 60 and codes.count(429) == 140, codes
        # Both gateways admitted some: the limit is shared, not per process.
        assert {i % 2 for i, r in enumerate(responses) if r.status_code == 200} == {0, 1}
        ok = next(r for r in responses if r.status_code == 200)
        assert ok.headers["x-ratelimit-limit-requests"] == "60"
        assert ok.headers["x-ratelimit-limit-tokens"] == "100000"
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    finally:
        for proc, _ in gateways:
            stop(proc)
        store.db.dispose()


def test_redis_restart_falls_back_then_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    import budrt.gateway.redis_limiter as rl

    monkeypatch.setattr(rl, "RETRY_REDIS_AFTER_S", 0.1)
    server = RedisServer().start()

    async def run() -> None:
        limiter = RedisLimiter(server.url, "open")
        limit = (Limit("restart", rpm=100),)
        try:
            assert not (await limiter.acquire(limit, 0)).local
            server.stop()  # Redis goes away mid-run: fail-open through the local limiter
            assert (await limiter.acquire(limit, 0)).local
            assert (await limiter.acquire(limit, 0)).local  # skipped Redis while it is down
            server.start()  # back on the same port: the client reconnects
            await asyncio.sleep(0.15)
            assert not (await limiter.acquire(limit, 0)).local
        finally:
            await limiter.close()

    try:
        asyncio.run(run())
    finally:
        server.stop()


def test_token_reservation_is_settled_with_actual_usage(tmp_path: Path, upstream: str) -> None:
    settings = _settings(tmp_path, upstream)  # in-process limiter
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("tokens", tpm=300)
    server = ServerThread(create_app(settings, key_store=store)).start()
    body = {**BODY, "max_tokens": 200}  # reserves ~220 of the 300: two at once would not fit
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
            first = c.post(CHAT, json=body)
            assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "300"
            assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100
            # The mock used 7 tokens: the rest of the reservation came back, so this fits.
            second = c.post(CHAT, json=body)
            assert second.status_code == 200
            assert int(second.headers["x-ratelimit-remaining-tokens"]) < 100
            third = c.post(CHAT, json={**body, "max_tokens": 1000})  # more than is left
            assert third.status_code == 429 and third.headers["x-ratelimit-remaining-tokens"] == "0"
            assert "tokens per minute" in third.json()["error"]["message"]
    finally:
        server.stop()
        store.db.dispose()


def test_redis_calendar_agrees_with_python(redis_server: RedisServer) -> None:
    """Budget periods are computed in Lua from Redis's clock: same days, months and ends."""
    script = CALENDAR + "local a, b, c, d = calendar(tonumber(ARGV[1])) return {a, b, c, d}"
    edges = [datetime(2024, 2, 29, 23, 59, 59), datetime(2023, 12, 31, 12), datetime(2100, 3, 1)]
    times = [d.replace(tzinfo=UTC).timestamp() for d in edges] + [0.0]
    rng = random.Random(5)
    times += [rng.uniform(0, 4e9) for _ in range(200)]

    async def run() -> None:
        redis = RespClient(redis_server.url, timeout_s=2)
        try:
            for now in times:
                micros = int(now * 1e6)
                got = await redis.call("EVAL", script, 0, micros)
                day, month, day_end, month_end = periods(micros / 1e6)
                assert [int(x) for x in got] == [day, month, int(day_end * 1e6), int(month_end * 1e6)], now
        finally:
            await redis.close()

    asyncio.run(run())


def test_local_budgets_reset_at_midnight_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    """A day's budget ends at 00:00 UTC; a refund arriving after it leaves the new day alone."""
    import types

    import budrt.gateway.local_limiter as rl

    clock = [datetime(2026, 1, 31, 23, 59, 50, tzinfo=UTC).timestamp()]
    monkeypatch.setattr(rl, "time", types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic))
    limiter = LocalLimiter()
    day = (Limit("day", tokens_per_day=100, tokens_per_month=1000),)

    async def run() -> None:
        held = await limiter.acquire(day, 90)
        with pytest.raises(RateLimited) as exc:
            await limiter.acquire(day, 20)
        assert exc.value.kind == "tokens_per_day" and exc.value.retry_after_s == pytest.approx(10)
        clock[0] += 20  # 00:00:10 on February 1st: a new day and a new month
        fresh = await limiter.acquire(day, 60)
        await limiter.release(held, 0)  # yesterday's reservation refunded: today keeps its 60
        with pytest.raises(RateLimited):
            await limiter.acquire(day, 50)
        await limiter.release(fresh, 10)
        await limiter.acquire(day, 90)

    asyncio.run(run())


async def _huge_values(limiter: LocalLimiter | RedisLimiter, tag: str) -> None:
    """`max_tokens` near 2**64 (or `n` huge): every counter stays exact and usable."""
    for i, huge in enumerate((2**64 - 1, 2**64 * 32, 10**30)):
        tpm = (Limit(f"{tag}:huge-tpm-{i}", tpm=1000),)
        ticket = await limiter.acquire(tpm, huge)  # admitted on a full bucket, charged the bucket
        assert ticket.headers["x-ratelimit-remaining-tokens"] == "0"
        await limiter.release(ticket, 7)  # it used 7: the rest comes back
        ticket = await limiter.acquire(tpm, 100)  # the next normal request fits at once
        assert 893 <= int(ticket.headers["x-ratelimit-remaining-tokens"]) <= 895

    # A budget: the first huge request is admitted on the unused budget; its usage is kept.
    budget = (Limit(f"{tag}:huge-budget", tokens_per_day=1000, tokens_per_month=10_000),)
    admitted = 0
    for _ in range(5):
        try:
            ticket = await limiter.acquire(budget, 2**64 - 1)
        except RateLimited as exc:
            assert exc.kind == "tokens_per_day"
            continue
        admitted += 1
        await limiter.release(ticket, 300)
    assert admitted == 1
    await limiter.acquire(budget, 700)  # 300 + 700: the whole budget
    with pytest.raises(RateLimited) as exc:
        await limiter.acquire(budget, 1)
    assert exc.value.kind == "tokens_per_day"

    # Negative amounts charge nothing and credit nothing.
    neg = (Limit(f"{tag}:neg", tpm=100, tokens_per_day=100, images_per_day=2),)
    ticket = await limiter.acquire(neg, -(10**20), images=-5)
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "100"
    await limiter.release(ticket, -50)
    await limiter.acquire(neg, 100, images=2)
    with pytest.raises(RateLimited):
        await limiter.acquire(neg, 1)
    with pytest.raises(RateLimited):
        await limiter.acquire((Limit(f"{tag}:neg", images_per_day=2),), 0, images=1)


def test_local_limiter_huge_values() -> None:
    asyncio.run(_huge_values(LocalLimiter(), "local"))


def test_redis_limiter_huge_values_and_integer_counters(redis_server: RedisServer) -> None:
    async def run() -> None:
        limiter = RedisLimiter(redis_server.url)
        redis = RespClient(redis_server.url, timeout_s=2)
        try:
            await _huge_values(limiter, "redis")
            assert not limiter.local._buckets and not limiter.local._budgets  # all from Redis
            # Every counter is integer text (HINCRBY's), whatever the requests asked for.
            for key in ("huge-tpm-0:t", "huge-tpm-1:t", "huge-budget:b", "neg:t", "neg:b"):
                stored = await redis.call("HGETALL", f"budrt:rl:redis:{key}")
                assert stored and all(re.fullmatch(rb"-?\d+", v) for v in stored[1::2]), (key, stored)
            # A counter an older script wrote as a float neither breaks the script (which would
            # count as an outage) nor frees the budget; it is rewritten as an integer.
            day, month, _, _ = periods(time.time())
            poisoned = ("td", "1.8446744073709552e+19", "tm", "12.5", "id", "-3", "im", "0")
            await redis.call("HSET", "budrt:rl:redis:legacy:b", "d", day, "m", month, *poisoned)
            with pytest.raises(RateLimited) as exc:
                await limiter.acquire((Limit("redis:legacy", tokens_per_day=1000),), 10)
            assert exc.value.kind == "tokens_per_day"
            await limiter.acquire((Limit("redis:legacy", tokens_per_month=1000, images_per_day=5),), 10, 1)
            stored = await redis.call("HMGET", "budrt:rl:redis:legacy:b", "tm", "id")
            assert stored == [b"22", b"1"]
            assert not limiter.local._budgets  # Redis decided, not the fail-open fallback
            # A bucket of whole tokens still keeps the fraction earned between two requests.
            tpm = (Limit("redis:fraction", tpm=60),)  # one token a second
            await limiter.acquire(tpm, 60)
            await asyncio.sleep(0.6)
            with pytest.raises(RateLimited) as exc:
                await limiter.acquire(tpm, 1)
            assert exc.value.retry_after_s <= 0.4
            await asyncio.sleep(0.6)
            await limiter.acquire(tpm, 1)
        finally:
            await redis.close()
            await limiter.close()

    asyncio.run(run())


def test_local_tpm_bucket_keeps_fractions(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import budrt.gateway.local_limiter as rl

    clock = [1000.0]
    monkeypatch.setattr(rl, "time", types.SimpleNamespace(time=time.time, monotonic=lambda: clock[0]))
    limiter = LocalLimiter()
    tpm = (Limit("fraction", tpm=60),)  # one token a second
    limiter.try_acquire(tpm, 60)
    for _ in range(3):
        clock[0] += 0.5
        with pytest.raises(RateLimited) as exc:
            limiter.try_acquire(tpm, 1)  # half a token
        assert exc.value.retry_after_s == pytest.approx(0.5)
        clock[0] += 0.5
        assert limiter.try_acquire(tpm, 1).headers["x-ratelimit-remaining-tokens"] == "0"
    assert isinstance(limiter._buckets["fraction"].tokens, int)


def test_rate_limited_headers_stay_finite() -> None:
    for retry in (float("inf"), float("nan"), 1e300, -5.0):
        for kind in ("tpm", "rpm", "tokens_per_day"):
            headers = RateLimited("key:1", kind, 10, retry).headers()
            assert 1 <= int(headers["Retry-After"]) <= 31 * 86400, headers
            assert not any(w in v for v in headers.values() for w in ("nan", "inf", "-")), headers


def test_redis_outage_keeps_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail-open falls back to budgets seeded from the usage records (again for each outage);
    by default a request with a budget is refused instead, while plain rate limits fail open."""
    import budrt.gateway.redis_limiter as rl

    monkeypatch.setattr(rl, "RETRY_REDIS_AFTER_S", 0.1)
    server = RedisServer().start()
    recorded = {"key:1": 0}  # what the usage records hold for the scope this day and month

    def seed(scope: str, since: datetime) -> tuple[int, int]:
        return recorded.get(scope, 0), 0

    budget = (Limit("key:1", rpm=100, tokens_per_day=1000),)
    plain = (Limit("key:2", rpm=100),)

    async def run() -> None:
        strict = RedisLimiter(server.url, "open", seed=seed)
        lenient = RedisLimiter(server.url, "open", seed=seed, budget_fail_mode="open")
        try:
            ticket = await lenient.acquire(budget, 600)
            assert not ticket.local
            await lenient.release(ticket, 600)
            recorded["key:1"] = 600  # metered
            server.stop()  # Redis goes away
            with pytest.raises(LimiterUnavailable):
                await strict.acquire(budget, 10)  # budgets fail closed
            assert (await strict.acquire(plain, 10)).local  # plain rate limits fail open
            ticket = await lenient.acquire(budget, 300)  # 600 recorded + 300
            assert ticket.local
            with pytest.raises(RateLimited) as exc:
                await lenient.acquire(budget, 200)
            assert exc.value.kind == "tokens_per_day"
            await lenient.release(ticket, 300)

            server.start()  # back: Redis counts again (it missed the 300 used meanwhile)
            await asyncio.sleep(0.15)
            assert not (await lenient.acquire(budget, 50)).local
            recorded["key:1"] = 950
            server.stop()  # a new outage: the fallback's budget is loaded afresh (950, not 900)
            await asyncio.sleep(0.15)
            with pytest.raises(RateLimited):
                await lenient.acquire(budget, 100)
            assert (await lenient.acquire(budget, 50)).local
        finally:
            await strict.close()
            await lenient.close()

    try:
        asyncio.run(run())
    finally:
        server.stop()


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "redis"])
def test_counts_in_requests_through_the_gateway(
    tmp_path: Path, upstream: str, redis_server: RedisServer, shared: bool
) -> None:
    """`max_tokens`, `max_completion_tokens`, `n` and `stream` of any type: a 400 naming the
    field, or (huge) a reservation clamped to the tpm bucket that the actual usage settles."""
    extra = {"redis_url": redis_server.url} if shared else {}
    settings = _settings(tmp_path, upstream, **extra)
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    keys = [store.create(f"counts-{i}", tpm=1000, budgets={"tokens_per_day": 10_000})[0] for i in range(4)]
    server = ServerThread(create_app(settings, key_store=store)).start()
    bad = [
        ("max_tokens", "100"),
        ("max_tokens", True),
        ("max_tokens", -1),
        ("max_tokens", 1.5),
        ("max_completion_tokens", [1]),
        ("n", 0),
        ("n", "2"),
        ("n", False),
        ("stream", "true"),
        ("stream", 1),
    ]
    huge = [{"max_tokens": 2**64 - 1}, {"max_tokens": 2**64 - 1, "n": 2**63}, {"n": 1e30}]
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            auth = {"Authorization": f"Bearer {keys[0]}"}
            for field, value in bad:
                resp = c.post(CHAT, json={**BODY, field: value}, headers=auth)
                assert resp.status_code == 400, (field, value, resp.text)
                assert resp.json()["error"]["param"] == field
            for key, fields in zip(keys[1:], huge, strict=True):
                auth = {"Authorization": f"Bearer {key}"}
                resp = c.post(CHAT, json={**BODY, **fields}, headers=auth)
                assert resp.status_code == 200, resp.text
                assert resp.headers["x-ratelimit-remaining-tokens"] == "0"  # the whole bucket, no more
                # The mock used 7 tokens: the rest came back, so a normal request fits at once.
                resp = c.post(CHAT, json={**BODY, "max_tokens": 100}, headers=auth)
                assert resp.status_code == 200, resp.text
                assert int(resp.headers["x-ratelimit-remaining-tokens"]) > 800
    finally:
        server.stop()
        store.db.dispose()


def test_a_body_too_deep_to_forward_is_400_and_leaks_no_slot(tmp_path: Path, upstream: str) -> None:
    """orjson reads deeper nesting than it writes: an alias (renamed, so written again) once
    raised a 500 after the limits were taken, and the key's concurrency slot was never given back."""
    settings = Settings(
        home=tmp_path,
        secret_key="test-secret-test-secret",
        deployments=[DeploymentConfig(model="m", aliases=["alias"], endpoints=[upstream])],
        gateway={"ratelimit": {"key_concurrency": 1}},
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("deep")
    server = ServerThread(create_app(settings, key_store=store)).start()
    deep = b'{"model": "alias", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 300
    deep += b"]" * 300 + b"}"
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
            for _ in range(2):
                resp = c.post(CHAT, content=deep, headers={"Content-Type": "application/json"})
                assert resp.status_code == 400, resp.text
                assert "nested too deeply" in resp.json()["error"]["message"]
            assert c.post(CHAT, json={**BODY, "model": "alias"}).status_code == 200
    finally:
        server.stop()
        store.db.dispose()
