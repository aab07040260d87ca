"""The request head (request line + headers) is bounded in the servers' HTTP protocol: a client
sending megabytes of headers gets 431 and its connection closed, and nobody else notices."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import orjson

from budrt.config import Settings
from budrt.protocol.http_server import MAX_HEAD_BYTES
from tests.procs import start_gateway, stop


def _send_raw(url: str, head: bytes, chunk: int = 16 * 1024) -> bytes:
    """Send `head` in chunks (the server may close early); everything the server answered."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            for i in range(0, len(head), chunk):
                sock.sendall(head[i : i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us: the answer is already on its way
        answer = b""
        while data := sock.recv(65536):
            answer += data
        return answer


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body), however many reads it takes."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_an_oversized_head_is_431_and_others_are_served(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, secret_key="head-test-secret-0123456789", models=[], model_servers=[])
    proc, url = start_gateway(settings, tmp_path / "runtime.json")
    try:
        filler = b"x" * (4 * MAX_HEAD_BYTES)
        answer = _send_raw(url, b"GET /health/live HTTP/1.1\r\nHost: a\r\nX-Filler: " + filler + b"\r\n\r\n")
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 431"), answer[:200]
        body = orjson.loads(rest.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "headers_too_large"
        # Many headers, each small, count the same way.
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"y" * 100) for i in range(2000))
        assert _send_raw(url, b"GET /health/live HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n").startswith(
            b"HTTP/1.1 431"
        )
        # Ordinary requests (a few KiB of headers, a body larger than the head bound) still pass.
        headers = {"X-Trace": "t" * 4096}
        assert httpx.get(url + "/health/live", headers=headers, timeout=5).status_code == 200
        big_body = b'{"model": "' + b"m" * (2 * MAX_HEAD_BYTES) + b'"}'
        resp = httpx.post(url + "/v1/chat/completions", content=big_body, timeout=5)
        assert resp.status_code == 401  # read to the end and answered: no key
        # A whole request arriving in one read (head and body) is not charged as a head, nor
        # carried over to the next request on the connection.
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            for size in (MAX_HEAD_BYTES - 2000, 3000, 3000):
                head = b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size
                sock.sendall(head + b"b" * size)
                assert _read_response(sock).startswith(b"HTTP/1.1 401")
    finally:
        stop(proc)
