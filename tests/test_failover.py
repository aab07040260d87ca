"""Failover against real upstream processes: killed, failing and hanging replicas; circuit
breaker ejection and readmission; model fallbacks; the per-request deadline."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson

from budrt.config import DeploymentConfig, Settings
from budrt.gateway.app import create_app
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.mock_upstream import MockUpstream, ServerThread, free_port
from tests.procs import start_upstream, stop

CHAT = "/v1/chat/completions"


def _chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def _gateway(home: Path, deployments: list[DeploymentConfig], **gateway: object) -> tuple[ServerThread, str]:
    settings = Settings(
        home=home, secret_key="test-secret-test-secret", deployments=deployments, gateway=gateway
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("k")
    return ServerThread(create_app(settings, key_store=store)).start(), key


def test_killed_failing_and_hanging_replicas(tmp_path: Path) -> None:
    good_proc, good = start_upstream("good")
    victim_port = free_port()
    victim_proc, victim = start_upstream("victim", victim_port)
    bad_proc, bad = start_upstream("bad", mode="502")  # a replica failing (a 500 is relayed)
    hang_proc, hang = start_upstream("hang", mode="hang")
    procs = [good_proc, victim_proc, bad_proc, hang_proc]
    dep = DeploymentConfig(model="m", endpoints=[bad, hang, victim, good], strategy="p2c", timeout_s=0.5)
    server, key = _gateway(
        tmp_path, [dep], retries=3, breaker_failures=2, breaker_cooldown_s=0.5, retry_backoff_s=0.001
    )
    gw = server.server.config.app.state.gateway
    eps = {e.base_url: e for e in gw.router.deployments[0].endpoints}
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:

            def one(i: int) -> str:
                resp = c.post(CHAT, json=_chat("m"))
                assert resp.status_code == 200, resp.text
                return resp.json()["served_by"]

            with ThreadPoolExecutor(4) as pool:
                served = list(pool.map(one, range(12)))
                stop(victim_proc)  # killed mid-run
                served += list(pool.map(one, range(24)))
            assert set(served) <= {"good", "victim"} and "good" in served
            assert served[-8:] == ["good"] * 8  # only the survivor serves once the others are out
            for url in (bad, hang, victim):
                assert eps[url].breaker.ejected, url  # each bad replica is ejected

            # The replicas recover: half-open probes readmit them.
            httpx.post(bad.removesuffix("/v1") + "/_mode/ok")
            httpx.post(hang.removesuffix("/v1") + "/_mode/ok")
            procs.append(start_upstream("victim", victim_port)[0])
            seen: Counter[str] = Counter()
            deadline = time.monotonic() + 15
            while not all(not eps[u].breaker.ejected for u in (bad, hang, victim)) or len(seen) < 4:
                assert time.monotonic() < deadline, (seen, [eps[u].breaker.open_until for u in eps])
                seen[one(0)] += 1
                time.sleep(0.02)
            assert set(seen) == {"good", "victim", "bad", "hang"}  # all back in rotation
    finally:
        server.stop()
        for p in procs:
            stop(p)


def test_fallback_model_and_deadline(tmp_path: Path) -> None:
    up = MockUpstream("backup")
    upstream = ServerThread(up.app).start()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    deployments = [
        DeploymentConfig(model="primary", endpoints=[dead], fallbacks=["backup"]),
        DeploymentConfig(model="backup", endpoints=[upstream.url + "/v1"]),
        DeploymentConfig(model="slow", endpoints=[upstream.url + "/v1"]),
    ]
    server, key = _gateway(tmp_path, deployments, request_deadline_s=0.5)
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
            resp = c.post(CHAT, json=_chat("primary", temperature=0.3))
            assert resp.status_code == 200 and resp.json()["served_by"] == "backup"
            assert up.last_body == _chat("backup", temperature=0.3)  # renamed for the fallback
            start = time.monotonic()
            resp = c.post(CHAT, json=_chat("slow", mock="hang"))
            assert resp.status_code == 504 and resp.json()["error"]["code"] == "upstream_timeout"
            assert time.monotonic() - start < 3
    finally:
        server.stop()
        upstream.stop()


def test_requests_waiting_on_a_hung_replica_are_not_left_hanging(tmp_path: Path) -> None:
    """SIGSTOP model servers with requests in flight: the health check finds them hung and the
    gateway retries on the other replica, answers 503 + Retry-After without one, and ends a
    stream that was relaying with an error event; all long before the 600 s read timeout."""
    a_proc, a = start_upstream("a", mode="hang")  # holds its requests until stopped
    b_proc, b = start_upstream("b")
    c_proc, c = start_upstream("c")
    procs = [a_proc, b_proc, c_proc]
    deployments = [
        DeploymentConfig(model="m", endpoints=[a, b], managed=True),
        DeploymentConfig(model="solo", endpoints=[c], managed=True),
    ]
    server, key = _gateway(tmp_path, deployments, health_interval_s=0.2, retry_backoff_s=0.001)
    gw = server.server.config.app.state.gateway
    stats = {u: u.removesuffix("/v1") + "/_stats" for u in (a, c)}
    try:
        deadline = time.monotonic() + 10
        while not all(e.ready for e in gw.router.endpoints()):
            assert time.monotonic() < deadline, gw.router.endpoints()
            time.sleep(0.05)
        headers = {"Authorization": f"Bearer {key}"}
        with (
            httpx.Client(base_url=server.url, headers=headers, timeout=30) as c1,
            ThreadPoolExecutor(8) as pool,
        ):
            first_chunk = threading.Event()

            def stream() -> bytes:
                body = _chat("solo", stream=True, mock_chunks=200, mock_delay=0.05)
                with c1.stream("POST", CHAT, json=body) as resp:
                    assert resp.status_code == 200
                    got = b""
                    for chunk in resp.iter_raw():
                        got += chunk
                        first_chunk.set()
                    return got

            streamed = pool.submit(stream)
            plain = [pool.submit(c1.post, CHAT, json=_chat("m")) for _ in range(6)]
            solo = pool.submit(c1.post, CHAT, json=_chat("solo", mock="hang"))
            deadline = time.monotonic() + 10
            while not (
                first_chunk.is_set()
                and httpx.get(stats[a]).json()["requests"] >= 1
                and httpx.get(stats[c]).json()["requests"] >= 2
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            stopped_at = time.monotonic()
            for p in (a_proc, c_proc):
                p.send_signal(signal.SIGSTOP)
            answers = [f.result(timeout=15) for f in plain]
            assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
            assert {r.json()["served_by"] for r in answers} == {"b"}
            lone = solo.result(timeout=15)
            assert lone.status_code == 503 and lone.headers["retry-after"] == "1", lone.text
            assert lone.json()["error"]["code"] == "no_healthy_upstream"
            got = streamed.result(timeout=15)
            assert time.monotonic() - stopped_at < 8  # detection is ~2 health checks
        events = got.strip().split(b"\n\n")
        assert events[-1] == b"data: [DONE]" and events[0].startswith(b"data: {")
        assert orjson.loads(events[-2].removeprefix(b"data: "))["error"]["code"] == "upstream_unresponsive"
        assert got.count(b"tok") < 200
        assert not any(e.waiters for e in gw.router.endpoints())
    finally:
        server.stop()
        for p in procs:
            p.send_signal(signal.SIGCONT)
            stop(p)


def test_fallbacks_respect_the_callers_models_rbac_and_their_own_limits(tmp_path: Path) -> None:
    """A fallback serves only a caller who may use it (model list, RBAC), within its own model
    limits, charged when it is tried: skipped otherwise, leaving the primary's own failure."""
    backup = MockUpstream("backup")
    upstream = ServerThread(backup.app).start()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    deployments = [
        DeploymentConfig(model="primary", endpoints=[dead], fallbacks=["backup"]),
        DeploymentConfig(model="backup", endpoints=[upstream.url + "/v1"], rpm=3, max_concurrent=1),
    ]
    settings = Settings(home=tmp_path, secret_key="test-secret-test-secret", deployments=deployments)
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    listed, _ = store.create("listed", models=["primary"])  # its model list names only the primary
    rbac, _ = store.create("rbac", permissions=["inference:*@model:primary"])  # RBAC: only the primary
    both, _ = store.create("both")
    server = ServerThread(create_app(settings, key_store=store)).start()

    def post(key: str, body: dict[str, object]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.post(server.url + CHAT, json=body, headers=headers, timeout=10)

    try:
        for key in (listed, rbac):
            resp = post(key, _chat("primary"))
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "no_healthy_upstream"
            assert resp.json()["error"]["message"].count("`primary`") == 1
            assert post(key, _chat("backup")).status_code in (403, 404)
        assert backup.requests == 0  # never asked on their behalf

        resp = post(both, _chat("primary"))
        assert resp.status_code == 200 and resp.json()["served_by"] == "backup"
        with httpx.stream(
            "POST",
            server.url + CHAT,
            json=_chat("primary", stream=True),
            headers={"Authorization": f"Bearer {both}"},
        ) as streamed:
            assert streamed.status_code == 200 and b"[DONE]" in streamed.read()
        # backup's one concurrency slot came back after each: a third fallback fits...
        assert post(both, _chat("primary")).status_code == 200
        # ...but backup's rpm (3) is spent by the requests that fell back to it.
        resp = post(both, _chat("primary"))
        assert resp.status_code == 503 and backup.requests == 3
        refused = post(both, _chat("backup"))
        assert refused.status_code == 429 and "3 requests per minute for this model" in refused.text

        # A body that cannot be written again for the fallback: a 400, not a 500.
        deep = b'{"model": "primary", "messages": [], "x": ' + b"[" * 300 + b"]" * 300 + b"}"
        resp = httpx.post(
            server.url + CHAT,
            content=deep,
            headers={"Authorization": f"Bearer {both}", "Content-Type": "application/json"},
            timeout=10,
        )
        assert resp.status_code == 400, resp.text
    finally:
        server.stop()
        upstream.stop()
        store.db.dispose()
