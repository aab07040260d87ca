"""What one request may cost the gateway, or do to other callers, over real HTTP: the request
body cap (413, also chunked and on Starlette's routes), the cap on upstream bodies (502), the
circuit breaker fed only by replica failures, and upstream headers the gateway drops."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from budrt.config import DeploymentConfig
from tests.gateway.identity import CHAT, Gateway, chat, settings, start
from tests.mock_upstream import MockUpstream, ServerThread

BODY_LIMIT = 64 * 1024
RESPONSE_LIMIT = 1 << 20


@dataclass
class Env:
    gw: Gateway
    key: str
    up: MockUpstream
    other: MockUpstream


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    up, other = MockUpstream("up"), MockUpstream("other")
    servers = [ServerThread(up.app).start(), ServerThread(other.app).start()]
    gateway = {
        "max_body_bytes": BODY_LIMIT,
        "max_response_bytes": RESPONSE_LIMIT,
        "breaker_failures": 2,
        "breaker_cooldown_s": 60.0,
        "retry_backoff_s": 0.001,
    }
    s = settings(tmp_path_factory.mktemp("gw"), servers[0].url + "/v1", ["m"], gateway=gateway)
    pair = DeploymentConfig(model="pair", endpoints=[s.url + "/v1" for s in servers], strategy="weighted_rr")
    guarded = DeploymentConfig(model="guarded", endpoints=[servers[0].url + "/v1"], api_key="sk-gateway-own")
    s = s.model_copy(update={"deployments": [*s.deployments, pair, guarded]})
    gw = start(s)
    key, _ = gw.store.create("admin", role="admin")
    yield Env(gw, key, up, other)
    gw.stop()
    for server in servers:
        server.stop()


def _error(resp: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


def _raw(env: Env, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request by hand (headers, then the body parts as given) and return the response
    head; never finishes a body the server should not have waited for."""
    with socket.create_connection(("127.0.0.1", env.gw.server.port), timeout=5) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        got = b""
        while b"\r\n\r\n" not in got:
            data = sock.recv(65536)
            assert data, got
            got += data
        return got


def _head(env: Env, path: str, *lines: str) -> bytes:
    auth = f"Authorization: Bearer {env.key}"
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: gw", auth, *lines, "", ""]).encode()


def _chunked(total: int, size: int = 4096) -> list[bytes]:
    return [b"%x\r\n" % size + b"x" * size + b"\r\n" for _ in range(total // size)]


def test_request_bodies_are_capped_on_the_proxied_path(env: Env) -> None:
    before = env.up.requests
    with env.gw.client(env.key) as c:
        fits = chat("m", messages=[{"role": "user", "content": "x" * (BODY_LIMIT - 200)}])
        assert c.post(CHAT, json=fits).status_code == 200
        big = chat("m", messages=[{"role": "user", "content": "x" * BODY_LIMIT}])
        error = _error(c.post(CHAT, json=big), 413, "request_too_large")
        assert error["type"] == "invalid_request_error" and str(BODY_LIMIT) in str(error["message"])
        assert c.post(CHAT, json=chat("m")).status_code == 200  # the connection and gateway are fine
    assert env.up.requests == before + 2  # the big one never went upstream
    # Chunked, no Content-Length: answered once the cap is passed, the body never finished.
    head = _head(env, CHAT, "Content-Type: application/json", "Transfer-Encoding: chunked")
    assert _raw(env, head, _chunked(2 * BODY_LIMIT)).startswith(b"HTTP/1.1 413 ")
    # A declared length over the cap is refused after the first part, not read to the end.
    head = _head(env, CHAT, "Content-Type: application/json", "Content-Length: 1000000000")
    assert _raw(env, head, [b"{" + b" " * (2 * BODY_LIMIT)]).startswith(b"HTTP/1.1 413 ")


def test_request_bodies_are_capped_on_every_other_route(env: Env) -> None:
    with env.gw.client(env.key) as c:
        big = {"name": "x" * BODY_LIMIT}
        error = _error(c.post("/admin/users", json=big), 413, "request_too_large")
        assert error["type"] == "invalid_request_error"
        # Chunked: cut off by whoever reads the body, still our JSON error shape.
        parts = iter([b'{"name": "', b"x" * BODY_LIMIT, b'"}'])
        _error(c.post("/admin/users", content=parts), 413, "request_too_large")
        # Even an unauthenticated request: a declared length over the cap is refused unread.
        resp = httpx.post(env.gw.url + "/admin/replicas/heartbeat", json=big)
        _error(resp, 413, "request_too_large")
        assert c.post("/admin/users", json={"name": "small-user"}).status_code in (200, 201)
    head = _head(env, "/admin/users", "Content-Type: application/json", "Transfer-Encoding: chunked")
    got = _raw(env, head, _chunked(2 * BODY_LIMIT))
    assert got.startswith(b"HTTP/1.1 413 ") and b"application/json" in got.lower()


def test_upstream_bodies_are_bounded(env: Env) -> None:
    with env.gw.client(env.key, timeout=30) as c:
        ok = c.post(CHAT, json=chat("m", mock="huge", mock_bytes=RESPONSE_LIMIT))
        assert ok.status_code == 200 and len(ok.content) == RESPONSE_LIMIT
        for chunked in (False, True):
            start = time.monotonic()
            body = chat("m", mock="huge", mock_bytes=256 * RESPONSE_LIMIT, mock_chunked=chunked)
            error = _error(c.post(CHAT, json=body), 502, "upstream_response_too_large")
            assert error["type"] == "server_error"
            assert time.monotonic() - start < 10  # stopped at the limit, not read to the end
        # The request asked for it: the replica is not held responsible.
        for _ in range(3):
            _error(
                c.post(CHAT, json=chat("m", mock="huge", mock_bytes=2 * RESPONSE_LIMIT)),
                502,
                "upstream_response_too_large",
            )
        assert c.post(CHAT, json=chat("m")).status_code == 200


def test_client_errors_never_eject_a_replica(env: Env) -> None:
    before = env.up.requests + env.other.requests
    with env.gw.client(env.key) as c:
        for status in (400, 404, 422, 500):
            for _ in range(4):  # twice the breaker's threshold, in a row
                resp = c.post(CHAT, json=chat("m", mock_status=status))
                assert resp.status_code == status and resp.json()["error"]["message"] == "mock failure"
        for _ in range(4):
            assert c.post(CHAT, json=chat("m", mock="bad_request")).status_code == 400
        assert c.post(CHAT, json=chat("m")).json()["served_by"] == "up"  # still routable
        # A 500 is relayed as it came, not retried on another replica.
        sent = env.up.requests + env.other.requests
        for _ in range(4):
            assert c.post(CHAT, json=chat("pair", mock_status=500)).status_code == 500
        assert env.up.requests + env.other.requests == sent + 4
        served = {c.post(CHAT, json=chat("pair")).json()["served_by"] for _ in range(4)}
        assert served == {"up", "other"}  # both still in rotation
        # A replica's own failure (503) is still retried elsewhere and counted.
        resp = c.post(CHAT, json=chat("m", mock_status=503))
        assert resp.status_code == 503 and resp.headers["retry-after"] == "7"
    assert env.up.requests + env.other.requests > before


def test_upstream_headers_that_are_not_relayed(env: Env) -> None:
    sent = [
        ["set-cookie", "session=stolen; Path=/"],
        ["set-cookie2", "old=1"],
        ["alt-svc", 'h2="evil.example:443"'],
        ["keep-alive", "timeout=5"],
        ["connection", "x-hop"],
        ["x-hop", "1"],
        ["x-kept", "yes"],
    ]
    with env.gw.client(env.key) as c:
        resp = c.post(CHAT, json=chat("m", mock_headers=sent))
        assert resp.status_code == 200 and resp.headers["x-kept"] == "yes"
        for name in ("set-cookie", "set-cookie2", "alt-svc", "keep-alive", "x-hop"):
            assert name not in resp.headers, name
        assert not c.cookies
        assert orjson.loads(resp.content)["served_by"] == "up"


def test_unknown_model_names_are_not_echoed_whole(env: Env) -> None:
    name = "no-such-model-" + "x" * 50_000
    with env.gw.client(env.key) as c:
        for resp in (c.post(CHAT, json=chat(name)), c.get("/v1/models/" + name[:8000])):
            error = _error(resp, 404, "model_not_found")
            assert error["param"] == "model" and len(resp.content) < 1000


def test_an_upstream_refusing_the_gateways_key_is_its_failure(env: Env) -> None:
    """Not relayed as the client's 401 (the upstream's body may quote the key), counted."""
    with env.gw.client(env.key) as c:
        for _ in range(2):  # the breaker's threshold
            resp = c.post(CHAT, json=chat("guarded", mock_status=401))
            error = _error(resp, 502, "upstream_auth_failed")
            assert "mock failure" not in resp.text and error["type"] == "server_error"
        assert env.up.last_headers["authorization"] == "Bearer sk-gateway-own"
        _error(c.post(CHAT, json=chat("guarded")), 503, "no_healthy_upstream")  # ejected
        assert c.post(CHAT, json=chat("m")).status_code == 200  # the same server, other deployment
