"""The proxied POST paths skip Starlette's middleware and router (`GatewayApp`); the same
endpoint still serves them through Starlette when the app is mounted under a root path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from budrt.gateway.app import create_app
from budrt.gateway.stream import Buffered
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from budrt.store.usage import UsageStore
from tests.gateway.identity import CHAT, chat, settings
from tests.mock_upstream import MockUpstream, ServerThread


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ServerThread(MockUpstream("up").app).start()
    yield server.url + "/v1"
    server.stop()


def _serve(tmp_path: Path, upstream: str, root_path: str = "") -> tuple[ServerThread, KeyStore]:
    s = settings(tmp_path, upstream, ["m1"])
    migrate(s.database_url_resolved)
    store = KeyStore.from_settings(s)
    server = ServerThread(create_app(s, key_store=store))
    server.server.config.root_path = root_path  # uvicorn puts it in front of every path
    return server.start(), store


def _wait_rows(usage: UsageStore, n: int) -> None:
    deadline = time.monotonic() + 5
    while usage.count() < n:
        assert time.monotonic() < deadline, f"{usage.count()} usage rows, expected {n}"
        time.sleep(0.05)


@pytest.mark.parametrize("root_path", ["", "/api"])
def test_proxied_paths_with_and_without_starlette(tmp_path: Path, upstream: str, root_path: str) -> None:
    server, store = _serve(tmp_path, upstream, root_path)
    try:
        key, _ = store.create("k", rpm=1000, tpm=1_000_000)
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
            resp = c.post(CHAT, json=chat("m1"))
            assert resp.status_code == 200
            body = resp.json()
            assert body["served_by"] == "up" and body["usage"]["total_tokens"] == 7
            assert resp.headers["content-type"] == "application/json"
            assert int(resp.headers["content-length"]) == len(resp.content)
            assert resp.headers["x-ratelimit-limit-requests"] == "1000"
            assert int(resp.headers["x-ratelimit-remaining-requests"]) == 999
            with c.stream("POST", CHAT, json=chat("m1", stream=True, mock_chunks=3)) as s:
                raw = b"".join(s.iter_raw())
            assert s.status_code == 200 and raw.endswith(b"data: [DONE]\n\n") and raw.count(b"data: ") == 5
            # Other methods on a proxied path still get Starlette's JSON 405.
            wrong = c.get(CHAT)
            assert wrong.status_code == 405 and wrong.json()["error"]["message"] == "Method not allowed."
            assert c.post(CHAT, content=b"{not json").json()["error"]["type"] == "invalid_request_error"
        usage = UsageStore(store.db)
        _wait_rows(usage, 3)  # both 200s and the 400 were metered
    finally:
        server.stop()
        store.db.dispose()


def test_buffered_headers() -> None:
    upstream_headers = [(b"content-type", b"application/json"), (b"x-ratelimit-limit-requests", b"9")]
    resp = Buffered(200, b"{}", upstream_headers, [(b"x-ratelimit-limit-requests", b"60")])
    # The gateway's headers replace the upstream's of the same name; the length is the body's.
    assert resp.raw_headers == [
        (b"content-type", b"application/json"),
        (b"x-ratelimit-limit-requests", b"60"),
        (b"content-length", b"2"),
    ]
    assert resp.header(b"content-type") == b"application/json" and resp.header(b"x-missing") is None
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    asyncio.run(resp({"type": "http"}, receive, send))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"{}"
    assert Buffered(204, b"", []).raw_headers == []  # no content-length on a 204
