"""An upstream that closes a kept-alive connection just as the gateway sends a request on it (what
uvicorn does to connections idle for 5 s) costs the client nothing: the gateway tries that
endpoint once more on a fresh connection, even with one replica. An endpoint that closes every
connection unanswered gets that one retry, not a loop."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson
import pytest

from budrt.config import DeploymentConfig
from tests.gateway.identity import CHAT, Gateway, chat, settings, start

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)


@dataclass
class Upstream:
    """HTTP/1.1 by hand: answers the first `answered` POSTs of each connection (keep-alive), and
    closes the connection when the next one arrives, after reading it, without a byte back."""

    answered: int
    connections: int = 0
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, sock: socket.socket) -> None:
        with self.lock:
            self.connections += 1
        reader = sock.makefile("rb")
        posts = 0
        while True:
            head = _read_head(reader)
            if head is None:
                return
            length = next((int(v) for k, v in head if k == "content-length"), 0)
            reader.read(length)
            with self.lock:
                self.requests += 1
            posts += 1
            if posts > self.answered:
                return  # the caller closes the socket: the request goes unanswered
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode()
                + ANSWER
            )


def _read_head(reader: object) -> list[tuple[str, str]] | None:
    lines = []
    while True:
        line = reader.readline()  # type: ignore[attr-defined]
        if not line:
            return None
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line.decode("latin-1").rstrip("\r\n"))
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]


@dataclass
class Env:
    gw: Gateway
    key: str
    closing: Upstream  # closes every connection's second request
    broken: Upstream  # closes every request unanswered


def _serve(upstream: Upstream) -> tuple[socketserver.ThreadingTCPServer, str]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            upstream.serve(self.request)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    closing, broken = Upstream(answered=1), Upstream(answered=0)
    (closing_server, closing_url), (broken_server, broken_url) = _serve(closing), _serve(broken)
    s = settings(tmp_path_factory.mktemp("gw"), closing_url, ["closing"], gateway={"retry_backoff_s": 0.001})
    extra = DeploymentConfig(model="broken", endpoints=[broken_url])
    gw = start(s.model_copy(update={"deployments": [*s.deployments, extra]}))
    key, _ = gw.store.create("admin", role="admin")
    yield Env(gw, key, closing, broken)
    gw.stop()
    for server in (closing_server, broken_server):
        server.shutdown()
        server.server_close()


def test_a_kept_alive_connection_closed_under_a_request_is_retried_on_a_fresh_one(env: Env) -> None:
    with env.gw.client(env.key) as client:
        for i in range(3):  # each request after the first finds the pooled connection closing
            resp = client.post(CHAT, json=chat("closing"))
            assert resp.status_code == 200, (i, resp.text)
            assert resp.json()["choices"][0]["message"]["content"] == "ok"
    # Requests 2 and 3 each went out twice: once on the closing connection, once on a new one.
    assert (env.closing.requests, env.closing.connections) == (5, 3)


def test_an_endpoint_that_never_answers_gets_one_retry_then_a_503(env: Env) -> None:
    with env.gw.client(env.key) as client:
        resp = client.post(CHAT, json=chat("broken"))
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "no_healthy_upstream"
    assert env.broken.requests == 2
