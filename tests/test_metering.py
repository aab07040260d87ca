"""Usage metering: batched writes off the request path, flush on shutdown, `GET /v1/usage`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from starlette.responses import Response

from budrt.config import MeteringConfig
from budrt.gateway.metering import Meter, _Metered
from budrt.security.rbac import Principal
from budrt.store.tables import UsageRecord
from budrt.store.usage import UsageStore
from tests.gateway.identity import CHAT, Gateway, chat, settings, start
from tests.mock_upstream import MockUpstream, ServerThread


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ServerThread(MockUpstream("up").app).start()
    yield server.url + "/v1"
    server.stop()


def _rows(store: UsageStore) -> list[UsageRecord]:
    with store._sessions() as session:
        return list(session.scalars(select(UsageRecord).order_by(UsageRecord.id)))


def _wait_count(store: UsageStore, n: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while store.count() < n:
        assert time.monotonic() < deadline, f"{store.count()} rows, expected {n}"
        time.sleep(0.02)


def test_batches_and_flush_on_shutdown(tmp_path: Path, upstream: str) -> None:
    # A long interval: rows appear only as full batches, the rest only at shutdown.
    metering = {"batch_size": 5, "flush_interval_s": 60}
    g = start(settings(tmp_path, upstream, ["m1", "m2"], metering=metering))
    usage = UsageStore(g.store.engine)
    key, record = g.store.create("metered")
    stopped = False
    try:
        with g.client(key) as c:
            for i in range(10):
                assert c.post(CHAT, json=chat("m1" if i % 2 else "m2")).status_code == 200
            with c.stream("POST", CHAT, json=chat("m1", stream=True)) as resp:
                assert resp.status_code == 200 and b"".join(resp.iter_raw()).endswith(b"[DONE]\n\n")
            assert c.post(CHAT, json=chat("nope")).status_code == 404
        _wait_count(usage, 10)
        time.sleep(0.3)
        assert usage.count() == 10  # two full batches; two records still queued
        g.server.stop()  # a clean stop: the lifespan flushes the queue
        stopped = True
        rows = _rows(usage)
    finally:
        if not stopped:
            g.server.stop()
        g.store.engine.dispose()
    assert len(rows) == 12
    assert {r.key_id for r in rows} == {record.id} and {r.endpoint for r in rows} == {"chat"}
    non_stream, stream, missing = rows[0], rows[10], rows[11]
    assert (non_stream.model, non_stream.prompt_tokens, non_stream.completion_tokens) == ("m2", 5, 2)
    assert (stream.model, stream.prompt_tokens, stream.completion_tokens, stream.status) == ("m1", 5, 3, 200)
    assert (missing.model, missing.status, missing.prompt_tokens) == (None, 404, 0)
    assert all(r.latency_ms > 0 and not r.cache_hit for r in rows)
    assert all(abs(r.at.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1) for r in rows)


def test_own_usage(tmp_path: Path, upstream: str) -> None:
    g: Gateway = start(settings(tmp_path, upstream, ["m1", "m2"]))
    try:
        mine, _ = g.store.create("mine")
        other, _ = g.store.create("other")
        custom, _ = g.store.create("chat-only", permissions=["inference:chat"])
        with g.client(other) as c:
            c.post(CHAT, json=chat("m1")).raise_for_status()
        with g.client(mine) as c:
            for model in ("m1", "m1", "m2"):
                c.post(CHAT, json=chat(model)).raise_for_status()
            usage = c.get("/v1/usage").json()  # flushes first: just-finished requests count
            assert usage["object"] == "usage"
            assert usage["totals"] == {
                "requests": 3,
                "prompt_tokens": 15,
                "completion_tokens": 6,
                "total_tokens": 21,
                "cache_hits": 0,
            }
            assert [(d["model"], d["requests"]) for d in usage["data"]] == [("m1", 2), ("m2", 1)]
            past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
            assert c.get("/v1/usage", params={"end": past}).json()["totals"]["requests"] == 0
            since = str(time.time() - 3600)
            assert c.get("/v1/usage", params={"start": since}).json()["totals"]["requests"] == 3
            bad = c.get("/v1/usage", params={"start": "yesterday"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "start"
        with g.client(custom) as c:  # its permission list leaves out usage:read:own
            assert c.get("/v1/usage").status_code == 403
    finally:
        g.stop()


def test_meter_queue_is_bounded_and_cache_hits_recorded(tmp_path: Path) -> None:
    settings_ = settings(tmp_path, "http://127.0.0.1:9/v1", ["m"])
    g = start(settings_)
    g.server.stop()  # only the migrated database is needed
    usage = UsageStore(g.store.engine)
    meter = Meter(usage, MeteringConfig(batch_size=2, max_queue=3))
    principal = Principal(kind="key", id=7, name="k", key_id=7, user="u", team="t")

    async def run() -> None:
        body = b'{"id":"x","usage":{"prompt_tokens":4,"completion_tokens":1}}'
        hit = Response(body, headers={"x-budrt-cache": "hit"}, media_type="application/json")
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        for _ in range(5):  # the queue holds 3; two are dropped and counted
            await _Metered(hit, meter, principal, "m", "chat", time.monotonic())(
                {"type": "http"}, receive, send
            )
        assert sent[1]["body"] == body  # passed through unchanged
        await meter.close()

    asyncio.run(run())
    rows = _rows(usage)
    g.store.engine.dispose()
    assert len(rows) == 3
    assert all((r.cache_hit, r.prompt_tokens, r.user, r.team) == (True, 4, "u", "t") for r in rows)
