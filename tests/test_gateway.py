"""The gateway over real HTTP, in front of real (mock) upstream servers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from budrt.config import DeploymentConfig, Settings
from budrt.gateway.app import create_app
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.mock_upstream import MockUpstream, ServerThread, free_port

CHAT = "/v1/chat/completions"


@dataclass
class Env:
    url: str
    store: KeyStore
    key: str
    live: MockUpstream
    live_url: str
    failing: MockUpstream

    def client(self, key: str | None = None, timeout: float = 10) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def _settings(home: Path, deployments: list[DeploymentConfig]) -> Settings:
    return Settings(
        home=home,
        secret_key="test-secret-test-secret",
        deployments=deployments,
        gateway={"retries": 2, "health_interval_s": 0.1, "connect_timeout_s": 1.0},
    )


def _start_gateway(settings: Settings) -> tuple[ServerThread, KeyStore]:
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    return ServerThread(create_app(settings, key_store=store)).start(), store


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    live, failing = MockUpstream("live"), MockUpstream("failing")
    failing.mode = "502"  # the replica fails (a 500 would be relayed, not retried)
    servers = [ServerThread(live.app).start(), ServerThread(failing.app).start()]
    live_url, failing_url = servers[0].url + "/v1", servers[1].url + "/v1"
    dead = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    deployments = [
        DeploymentConfig(
            model="mock-chat", endpoints=[live_url], aliases=["chat-alias"], api_key="up-secret"
        ),
        DeploymentConfig(model="failover", endpoints=[dead[0], live_url]),
        DeploymentConfig(model="flaky", endpoints=[failing_url, live_url]),
        DeploymentConfig(model="only-502", endpoints=[failing_url]),
        DeploymentConfig(model="all-dead", endpoints=dead),
        DeploymentConfig(model="slow", endpoints=[live_url], timeout_s=0.3),
        DeploymentConfig(model="managed", endpoints=[live_url], managed=True),
    ]
    gateway, store = _start_gateway(_settings(tmp_path_factory.mktemp("gw"), deployments))
    key, _ = store.create("tests")
    yield Env(gateway.url, store, key, live, live_url, failing)
    gateway.stop()
    for s in servers:
        s.stop()
    store.db.dispose()


def _chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def _error_code(resp: httpx.Response) -> str:
    return resp.json()["error"]["code"]


def test_health_and_metrics(env: Env) -> None:
    with httpx.Client(base_url=env.url) as c:
        assert c.get("/health/live").json() == {"status": "ok"}
        deadline = time.monotonic() + 3
        while c.get("/health/ready").status_code != 200:  # managed endpoint checked every 0.1 s
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c.post(CHAT, json=_chat("mock-chat"), headers={"Authorization": f"Bearer {env.key}"})
        text = c.get("/metrics").text
    assert 'budrt_gateway_requests_total{model="mock-chat",status="200"}' in text
    assert 'budrt_gateway_tokens_total{kind="prompt",model="mock-chat"}' in text
    assert "budrt_gateway_in_flight_requests" in text


def test_auth_required(env: Env) -> None:
    with httpx.Client(base_url=env.url) as c:
        for headers in ({}, {"Authorization": "Bearer budrt-wrong"}, {"x-api-key": "nope"}):
            resp = c.post(CHAT, json=_chat("mock-chat"), headers=headers)
            assert resp.status_code == 401
            assert _error_code(resp) == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"api-key": env.key}).status_code == 200


def test_models(env: Env) -> None:
    with env.client() as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert "mock-chat" in ids and "all-dead" in ids
        assert c.get("/v1/models/chat-alias").json()["object"] == "model"
        assert _error_code(c.get("/v1/models/nope")) == "model_not_found"


def test_bad_requests(env: Env) -> None:
    before = env.live.requests
    with env.client() as c:
        assert _error_code(c.post(CHAT, json=_chat("nope"))) == "model_not_found"
        assert c.post(CHAT, content=b"{not json").status_code == 400
        assert c.post(CHAT, content=b"[1, 2]").status_code == 400
        assert c.post(CHAT, json={"messages": []}).json()["error"]["param"] == "model"
        # The model server's own 4xx passes through unchanged.
        resp = c.post(CHAT, json=_chat("mock-chat", mock="bad_request"))
        assert resp.status_code == 400 and resp.content == b'{"error":{"message":"mock says no","code":"x"}}'
    assert env.live.requests == before + 1  # nothing reached upstream except the passthrough


def test_proxy_non_stream_byte_for_byte(env: Env) -> None:
    body = orjson.dumps(_chat("mock-chat"))
    direct = httpx.post(env.live_url + "/chat/completions", content=body)
    with env.client() as c:
        resp = c.post(CHAT, content=body)
    assert resp.status_code == 200
    assert resp.content == direct.content
    assert env.live.last_headers["authorization"] == "Bearer up-secret"  # never the client's key


def test_alias_rewrites_model(env: Env) -> None:
    with env.client() as c:
        resp = c.post(CHAT, json=_chat("chat-alias"))
    assert resp.status_code == 200
    assert env.live.last_body["model"] == "mock-chat"


def test_proxy_stream_byte_for_byte(env: Env) -> None:
    body = orjson.dumps(_chat("mock-chat", stream=True, mock_chunks=5))
    direct = httpx.post(env.live_url + "/chat/completions", content=body).content
    with env.client() as c, c.stream("POST", CHAT, content=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        got = b"".join(resp.iter_raw())
    assert got == direct
    assert got.endswith(b"data: [DONE]\n\n")


def test_failover_from_dead_endpoint(env: Env) -> None:
    with env.client() as c:
        for _ in range(3):
            resp = c.post(CHAT, json=_chat("failover"))
            assert resp.status_code == 200, resp.text
            assert resp.json()["served_by"] == "live"


def test_failover_from_5xx(env: Env) -> None:
    before = env.failing.requests
    with env.client() as c:
        for _ in range(4):
            assert c.post(CHAT, json=_chat("flaky")).json()["served_by"] == "live"
        # With no other endpoint the upstream 5xx is passed through as it came.
        resp = c.post(CHAT, json=_chat("only-502"))
        assert resp.status_code == 502 and resp.json() == {"error": {"message": "mock failure"}}
    assert env.failing.requests > before
    # A 500 may be the request's doing: relayed as it came, never retried elsewhere.
    sent = env.live.requests + env.failing.requests
    with env.client() as c:
        resp = c.post(CHAT, json=_chat("flaky", mock_status=500))
    assert resp.status_code == 500 and env.live.requests + env.failing.requests == sent + 1


def test_upstream_503_keeps_retry_after(env: Env) -> None:
    env.failing.mode = "503"
    try:
        with env.client() as c:
            resp = c.post(CHAT, json=_chat("only-502"))
    finally:
        env.failing.mode = "502"
    assert resp.status_code == 503 and resp.headers["retry-after"] == "7"


def test_all_dead_is_503(env: Env) -> None:
    with env.client() as c:
        for _ in range(2):  # first: connect failures; second: endpoints already marked down
            resp = c.post(CHAT, json=_chat("all-dead"))
            assert resp.status_code == 503
            assert resp.headers["retry-after"] == "1"
            assert _error_code(resp) == "no_healthy_upstream"


def test_upstream_timeout_is_504(env: Env) -> None:
    with env.client() as c:
        resp = c.post(CHAT, json=_chat("slow", mock="hang"))
    assert resp.status_code == 504
    assert resp.json()["error"]["type"] == "timeout_error"


def test_model_restricted_key(env: Env) -> None:
    key, _ = env.store.create("restricted", models=["failover"])
    with env.client(key) as c:
        assert c.post(CHAT, json=_chat("failover")).status_code == 200
        assert _error_code(c.post(CHAT, json=_chat("mock-chat"))) == "model_not_found"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["failover"]
        assert c.get("/v1/models/mock-chat").status_code == 404


def test_rpm_limit(env: Env) -> None:
    key, _ = env.store.create("limited", rpm=2)
    with env.client(key) as c:
        ok = [c.post(CHAT, json=_chat("mock-chat")) for _ in range(2)]
        assert [r.status_code for r in ok] == [200, 200]
        assert ok[1].headers["x-ratelimit-remaining-requests"] == "0"
        resp = c.post(CHAT, json=_chat("mock-chat"))
    assert resp.status_code == 429
    assert _error_code(resp) == "rate_limit_exceeded"
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    assert resp.headers["x-ratelimit-limit-requests"] == "2"


def test_revoked_key_refused_quickly(env: Env) -> None:
    key, record = env.store.create("to-revoke")
    with env.client(key) as c:
        assert c.post(CHAT, json=_chat("mock-chat")).status_code == 200
        env.store.revoke(record.id)
        start = time.monotonic()
        while c.get("/v1/models").status_code != 401:
            assert time.monotonic() - start < 2.0
            time.sleep(0.05)


def _wait_cancelled(up: MockUpstream, before: int) -> None:
    deadline = time.monotonic() + 3
    while up.cancelled <= before:
        assert time.monotonic() < deadline, "upstream request was not cancelled"
        time.sleep(0.02)


def test_client_disconnect_mid_stream_cancels_upstream(env: Env) -> None:
    before = env.live.cancelled
    body = _chat("mock-chat", stream=True, mock_chunks=200, mock_delay=0.05)
    with env.client() as c, c.stream("POST", CHAT, json=body) as resp:
        first = next(resp.iter_raw())
        assert first.startswith(b"data: ")
    _wait_cancelled(env.live, before)


def test_client_disconnect_non_stream_cancels_upstream(env: Env) -> None:
    before = env.live.cancelled
    with env.client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post(CHAT, json=_chat("mock-chat", mock="hang"))
    _wait_cancelled(env.live, before)


def test_not_ready_when_managed_endpoint_down(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    deployments = [
        DeploymentConfig(model="m", endpoints=[dead], managed=True),
        DeploymentConfig(model="external", endpoints=[dead]),
    ]
    gateway, store = _start_gateway(_settings(tmp_path, deployments))
    try:
        key, _ = store.create("k")
        time.sleep(0.3)
        resp = httpx.get(gateway.url + "/health/ready")
        assert resp.status_code == 503 and _error_code(resp) == "not_ready"
        # A gateway pod's readiness: it has checked its model servers; their being down is no
        # reason to take it (and every other model's traffic) out of its Service.
        assert httpx.get(gateway.url + "/health/ready?scope=gateway").json() == {"status": "ready"}
        for hostile in ("pods", "x" * 4000, "gåteway", "-1", ""):
            resp = httpx.get(gateway.url + "/health/ready", params={"scope": hostile})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "scope", hostile
        # A managed endpoint that is not ready gets no traffic.
        resp = httpx.post(gateway.url + CHAT, json=_chat("m"), headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 503
        assert httpx.get(gateway.url + "/nope").json()["error"]["type"] == "not_found_error"
    finally:
        gateway.stop()
        store.db.dispose()


def test_stream_failover_and_broken_stream(env: Env) -> None:
    with env.client() as c:
        # A 5xx before the stream starts is retried on another endpoint.
        with c.stream("POST", CHAT, json=_chat("flaky", stream=True)) as resp:
            assert resp.status_code == 200
            assert b"".join(resp.iter_raw()).endswith(b"data: [DONE]\n\n")
        # Once bytes were sent, a broken upstream ends the stream with an SSE error event.
        body = _chat("mock-chat", stream=True, mock="die", mock_chunks=5, mock_die_after=2)
        with c.stream("POST", CHAT, json=body) as resp:
            got = b"".join(resp.iter_raw())
    assert resp.status_code == 200
    assert got.count(b"tok") == 2
    last = got.strip().split(b"\n\n")[-1]
    assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_error"
