"""Usage metering: batched writes off the request path, flush on shutdown, `GET /v1/usage`."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from starlette.responses import Response

from budrt.config import DeploymentConfig, MeteringConfig, Settings
from budrt.gateway.metering import ARCHIVE_PREFIX, DROPPED, Meter, _Metered, spool_dir
from budrt.gateway.spool import Segment
from budrt.security.kms import make_key_provider
from budrt.security.rbac import Principal
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from budrt.store.object_stores import make_object_store
from budrt.store.tables import UsageRecord
from budrt.store.usage import UsageStore
from tests.gateway.identity import CHAT, Gateway, chat, settings, start
from tests.mock_upstream import MockUpstream, ServerThread
from tests.procs import start_gateway, start_upstream, stop


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ServerThread(MockUpstream("up").app).start()
    yield server.url + "/v1"
    server.stop()


def _rows(store: UsageStore) -> list[UsageRecord]:
    with store.db.session() as session:
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
    usage = UsageStore(g.store.db)
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
        g.store.db.dispose()
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
                "images": 0,
                "pixels": 0,
                "steps": 0,
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


def test_meter_spools_every_record_and_bounds_what_the_disk_refuses(tmp_path: Path) -> None:
    settings_ = settings(tmp_path, "http://127.0.0.1:9/v1", ["m"])
    g = start(settings_)
    g.server.stop()  # only the migrated database is needed
    usage = UsageStore(g.store.db)
    meter = Meter(usage, MeteringConfig(batch_size=2, max_queue=3), tmp_path / "spool")
    principal = Principal(kind="key", id=7, name="k", key_id=7, user="u", team="t")
    dropped_before = DROPPED._value.get()

    async def run() -> None:
        await meter.start()
        body = b'{"id":"x","usage":{"prompt_tokens":4,"completion_tokens":1}}'
        hit = Response(body, headers={"x-budrt-cache": "hit"}, media_type="application/json")
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        async def one() -> None:
            await _Metered(hit, meter, principal, "m", "chat", time.monotonic())(
                {"type": "http"}, receive, send
            )

        for _ in range(5):  # every record spooled: nothing dropped however many wait
            await one()
        assert sent[1]["body"] == body  # passed through unchanged
        # A disk that refuses writes: records wait in memory (3 at most), the rest are counted.
        active = meter.spool.active
        assert active is not None
        good, active.fd = active.fd, os.open(os.devnull, os.O_RDONLY)
        for _ in range(5):
            await one()
        os.close(active.fd)
        active.fd = good
        await meter.close()  # the 3 kept in memory are spooled and written now

    asyncio.run(run())
    rows = _rows(usage)
    g.store.db.dispose()
    assert len(rows) == 8 and DROPPED._value.get() - dropped_before == 2
    assert all((r.cache_hit, r.prompt_tokens, r.user, r.team) == (True, 4, "u", "t") for r in rows)
    assert len({r.request_id for r in rows}) == 8
    assert list((tmp_path / "spool").iterdir()) == []  # all committed, nothing left to replay


class Durable:
    """A gateway process over a mock upstream process, its key and its usage table."""

    def __init__(self, home: Path, **metering: object) -> None:
        self.home = home
        self.upstream, url = start_upstream("up")
        self.settings = Settings(
            home=home,
            secret_key="test-secret-test-secret",
            deployments=[DeploymentConfig(model="m", endpoints=[url])],
            metering=metering,
        )
        migrate(self.settings.database_url_resolved)
        self.store = KeyStore.from_settings(self.settings)
        self.key, _ = self.store.create("load")
        self.usage = UsageStore(self.store.db)
        self.runs = 0

    def start(self) -> tuple[subprocess.Popen, str]:
        self.runs += 1
        return start_gateway(self.settings, self.home / f"runtime{self.runs}.json")

    def client(self, url: str) -> httpx.Client:
        return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {self.key}"}, timeout=10)

    def ids(self) -> list[str | None]:
        return [r.request_id for r in _rows(self.usage)]

    def close(self) -> None:
        stop(self.upstream)
        self.store.db.dispose()


def _load_then_sigkill(
    d: Durable, gateway: subprocess.Popen, url: str, answered_before_kill: int
) -> tuple[int, int]:
    """Six clients send chat requests until the gateway is SIGKILLed after `answered_before_kill`
    answers; returns (requests answered 200, requests cut by the kill)."""
    answered, broken, other = [0], [0], []
    lock, done = threading.Lock(), threading.Event()

    def load() -> None:
        with d.client(url) as c:
            while not done.is_set():
                try:
                    status = c.post(CHAT, json=chat("m")).status_code
                except httpx.HTTPError:  # the gateway died under this request
                    with lock:
                        broken[0] += 1
                    return
                with lock:
                    if status == 200:
                        answered[0] += 1
                    else:
                        other.append(status)

    threads = [threading.Thread(target=load) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while answered[0] < answered_before_kill and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(gateway.pid, signal.SIGKILL)  # mid-load: no shutdown, no last flush
        gateway.wait()
    finally:
        done.set()
        for t in threads:
            t.join()
    assert other == []
    return answered[0], broken[0]


def test_sigkill_mid_load_loses_no_answered_request_and_replays_once(tmp_path: Path) -> None:
    # Batches of 100 and no timed flush: at the kill (250 or a few more answered) at most 200 rows
    # are in the DB and the rest only in the spool, whatever the timing (with 20-row batches every
    # 0.2 s, a CI run once found the writer had caught up with all 302 answers).
    d = Durable(tmp_path, batch_size=100, flush_interval_s=60)
    gateway, url = d.start()
    try:
        answered, broken = _load_then_sigkill(d, gateway, url, 250)
        assert answered >= 250
        left = sorted(spool_dir(tmp_path).glob("*.jsonl"))
        assert left and len(d.ids()) < answered  # the rest is only in the spool now
        backup = tmp_path / "spool-copy"
        backup.mkdir()
        for f in left:
            shutil.copy2(f, backup / f.name)

        gateway, url = d.start()  # the same home and DB: the spool is replayed before serving
        ids = d.ids()
        stop(gateway)
        assert d.ids() == ids
        # Every request answered 200 has its row. A record is spooled just before its response
        # is sent, so a request cut by the kill may have one too (never more than were cut).
        assert answered <= len(ids) <= answered + broken, (len(ids), answered, broken)
        assert None not in ids and len(set(ids)) == len(ids)

        # A crash after a segment's insert but before its removal: replayed again, counted once.
        for f in backup.iterdir():
            shutil.copy2(f, spool_dir(tmp_path) / f.name)
        gateway, url = d.start()
        with d.client(url) as c:
            assert c.get("/v1/usage").json()["totals"]["requests"] == len(ids)  # flushes first
        stop(gateway)
        assert sorted(d.ids()) == sorted(ids)
        assert list(spool_dir(tmp_path).glob("*.jsonl")) == []
    finally:
        stop(gateway)
        d.close()


def test_a_db_outage_during_flush_is_retried_and_loses_nothing(tmp_path: Path) -> None:
    d = Durable(tmp_path, batch_size=10, flush_interval_s=0.1)
    gateway, url = d.start()
    try:
        with d.client(url) as c:
            for _ in range(10):
                assert c.post(CHAT, json=chat("m")).status_code == 200
            _wait_count(d.usage, 10)
            db = sqlite3.connect(tmp_path / "budrt.db")
            db.execute("ALTER TABLE usage_records RENAME TO usage_away")  # inserts now fail
            db.commit()
            for _ in range(25):
                assert c.post(CHAT, json=chat("m")).status_code == 200
            log = tmp_path / "runtime1.log"
            deadline = time.monotonic() + 10
            while log.read_text().count("usage write failed") < 2:  # at least one retry failed too
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.05)
            db.execute("ALTER TABLE usage_away RENAME TO usage_records")
            db.commit()
            db.close()
            _wait_count(d.usage, 35, timeout=15)
            assert c.post(CHAT, json=chat("m")).status_code == 200
        stop(gateway)
        ids = d.ids()
        assert len(ids) == 36 and len(set(ids)) == 36
    finally:
        stop(gateway)
        d.close()


def test_committed_segments_are_archived_sealed_in_the_object_store(tmp_path: Path, upstream: str) -> None:
    """`metering.archive`: each segment, once in the DB, is kept (encrypted) in the object store;
    its sealed lines read back, with the spool's key provider, as exactly the rows inserted."""
    g = start(settings(tmp_path, upstream, ["m"], metering={"archive": True, "flush_interval_s": 0.05}))
    usage = UsageStore(g.store.db)
    key, _ = g.store.create("archived")
    try:
        with g.client(key) as c:
            for _ in range(7):
                assert c.post(CHAT, json=chat("m")).status_code == 200
        _wait_count(usage, 7)
    finally:
        g.stop()  # the last segment too
    settings_ = g.settings
    objects = make_object_store(settings_)
    archived = objects.list(ARCHIVE_PREFIX)
    assert archived and all(
        re.fullmatch(r"usage-archive/\d{4}-\d\d-\d\d/[0-9a-f]+-\d+\.jsonl", o.key) for o in archived
    )
    ids = []
    for info in archived:
        copy = tmp_path / "restored" / info.key.rsplit("/", 1)[1]  # the name carries the boot id
        copy.parent.mkdir(exist_ok=True)
        stream = objects.open(info.key)
        assert stream is not None
        with stream, copy.open("wb") as out:
            out.write(stream.read())
        assert b'"budrt-spool-key"' in copy.read_bytes()[:200]  # the lines are sealed in there too
        segment = Segment.adopt(copy, make_key_provider(settings_))
        assert segment is not None
        ids += [record[0] for record in segment.records()]
        segment.close()
    assert sorted(ids) == sorted(r.request_id for r in _rows(usage))
    # The object store's files hold ciphertext only: no record's id in the clear.
    local = list((tmp_path / "objects").rglob("*.jsonl"))
    assert local and not any(i.encode() in f.read_bytes() for f in local for i in ids)
