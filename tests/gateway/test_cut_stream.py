"""A model server that dies inside an SSE event: the client gets the events that were whole, then
the gateway's error event, and no half event (which would run into the error event's line and
make both unreadable)."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import orjson
import pytest

from tests.gateway.identity import CHAT, Gateway, chat, settings, start

WHOLE = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n'
)
HALF = b'data: {"id":"c1","object":"chat.completion.chunk","choi'


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _serve_one(sock: socket.socket) -> None:
    """Reads a request, answers a chunked event stream with one whole event and half of the next,
    then closes the connection without ending the chunked body (a process killed mid-answer)."""
    reader = sock.makefile("rb")
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    reader.read(length)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    sock.sendall(head + _chunk(WHOLE) + _chunk(HALF))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            _serve_one(self.request)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    gw = start(settings(tmp_path_factory.mktemp("gw"), url, ["cut"]))
    key, _ = gw.store.create("admin", role="admin")
    yield gw, key
    gw.stop()
    server.shutdown()
    server.server_close()


def test_a_stream_cut_inside_an_event_ends_with_the_error_event_alone(gateway: tuple[Gateway, str]) -> None:
    gw, key = gateway
    with gw.client(key) as client, client.stream("POST", CHAT, json=chat("cut", stream=True)) as resp:
        assert resp.status_code == 200
        body = resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events), body
    parsed = [orjson.loads(e[6:]) for e in events]  # every event whole: no half one
    assert parsed[0]["choices"][0]["delta"]["content"] == "ok"
    assert parsed[-1]["error"]["code"] == "upstream_error", body
    assert len(events) == 2, body
