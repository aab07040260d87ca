"""A gateway process on a real PostgreSQL primary (and replica) through outages: the primary stopped
mid-load and started again, the replica promoted and the gateway pointed at it. Every request
answered has exactly one usage row afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from budrt.config import DeploymentConfig, Settings
from budrt.security.keys import generate_api_key
from budrt.store.database import Database
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from budrt.store.tables import UsageRecord
from tests.gateway.identity import CHAT, chat
from tests.pg_server import PostgresServer, require_postgres
from tests.procs import start_gateway, start_upstream, stop


@pytest.fixture
def upstream() -> Iterator[str]:
    proc, url = start_upstream("up")
    yield url
    stop(proc)


@pytest.fixture
def primary() -> Iterator[PostgresServer]:
    require_postgres()
    with PostgresServer() as server:
        migrate(server.url)
        yield server


def _settings(home: Path, upstream: str, url: str, replicas: list[str], stale_s: float) -> Settings:
    return Settings(
        home=home,
        secret_key="test-secret-test-secret",
        database_url=url,
        database_replica_urls=replicas,
        deployments=[DeploymentConfig(model="m", endpoints=[upstream])],
        auth={"cache_ttl_s": 0.2, "stale_key_window_s": stale_s},  # the cache expires during the outage
        metering={"batch_size": 10, "flush_interval_s": 0.1},
    )


@dataclass
class Load:
    """Four clients sending chat requests until stopped; counts what the gateway answered."""

    url: str
    key: str
    answered: int = 0
    broken: int = 0  # no answer: the gateway was stopped under the request or refused the connection
    other: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self._threads = [threading.Thread(target=self._send) for _ in range(4)]
        for t in self._threads:
            t.start()
        return self

    def _send(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=10) as c:
            while not self._stop.is_set():
                try:
                    status = c.post(CHAT, json=chat("m")).status_code
                except httpx.HTTPError:
                    with self._lock:
                        self.broken += 1
                    time.sleep(0.05)
                    continue
                with self._lock:
                    if status == 200:
                        self.answered += 1
                    else:
                        self.other.append(status)

    def wait_for(self, more: int, timeout: float = 30) -> None:
        target, deadline = self.answered + more, time.monotonic() + timeout
        while self.answered < target:
            assert time.monotonic() < deadline, (self.answered, self.other[-5:])
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _usage_ids(url: str) -> list[str | None]:
    db = Database(url)
    try:
        with db.session() as session:
            return list(session.scalars(select(UsageRecord.request_id)))
    finally:
        db.dispose()


def _admin_client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_primary_stopped_mid_load_keeps_serving_and_loses_no_usage(
    tmp_path: Path, upstream: str, primary: PostgresServer
) -> None:
    settings = _settings(tmp_path, upstream, primary.url, [], stale_s=60)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("load")
    admin, _ = store.create("ops", role="admin")
    store.db.dispose()
    gateway, url = start_gateway(settings, tmp_path / "runtime.json")
    load = Load(url, key)
    try:
        with _admin_client(url, admin) as ops:
            assert ops.get("/admin/keys").status_code == 200  # the admin key is now cached
            load.start()
            load.wait_for(50)
            primary.stop("immediate")
            time.sleep(0.5)  # past the cache's 0.2 s: keys now come from the stale window
            load.wait_for(100)
            refused = ops.post("/admin/keys", json={"name": "during"})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "database_unavailable"
            unseen = httpx.post(
                url + CHAT, json=chat("m"), headers={"Authorization": f"Bearer {generate_api_key()}"}
            )
            assert unseen.status_code == 503  # never seen: nothing to vouch for it
            metrics = httpx.get(url + "/metrics").text
            stale = [line for line in metrics.splitlines() if line.startswith("budrt:auth_stale_total")]
            assert stale and float(stale[0].split()[-1]) > 0
            primary.start()
            load.wait_for(50)
            assert ops.post("/admin/keys", json={"name": "after"}).status_code in (200, 201)
        load.stop()
    finally:
        load.stop()
        stop(gateway)  # a clean stop: what is still spooled is flushed
    assert load.other == []
    ids = _usage_ids(primary.url)
    assert None not in ids and len(set(ids)) == len(ids) == load.answered
    log = (tmp_path / "runtime.log").read_text()
    assert "serving keys from the stale cache" in log and "usage write failed" in log


def test_replica_serves_keys_then_is_promoted_and_takes_over(
    tmp_path: Path, upstream: str, primary: PostgresServer
) -> None:
    replica = primary.replica()
    try:
        # No stale window: with the primary gone, keys can only come from the replica.
        settings = _settings(tmp_path, upstream, primary.url, [replica.url], stale_s=0)
        store = KeyStore.from_settings(settings)
        key, _ = store.create("load")
        store.db.dispose()
        primary.wait_replayed(replica)
        gateway, url = start_gateway(settings, tmp_path / "runtime1.json")
        load = Load(url, key).start()
        try:
            load.wait_for(50)
            primary.stop("immediate")
            time.sleep(0.5)
            load.wait_for(100)  # keys read on the replica; usage waits in the spool
            replica.promote()
            stop(gateway)  # its spool is left for the next gateway (the primary is gone)
            load.stop()
            answered, broken = load.answered, load.broken
            # Point the platform at the promoted replica: the same home, spool included.
            promoted = settings.model_copy(
                update={"database_url": SecretStr(replica.url), "database_replica_urls": []}
            )
            gateway, url = start_gateway(promoted, tmp_path / "runtime2.json")
            load = Load(url, key).start()
            load.wait_for(50)
            load.stop()
        finally:
            load.stop()
            stop(gateway)
        assert load.other == []
        ids = _usage_ids(replica.url)
        assert None not in ids and len(set(ids)) == len(ids)
        # A record is spooled just before its response: a request cut by the first gateway's stop
        # may have one too (never more than were cut).
        assert answered + load.answered <= len(ids) <= answered + broken + load.answered
    finally:
        replica.close()
