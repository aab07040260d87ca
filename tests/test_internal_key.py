"""Model servers require the platform's internal credential: a real model-server process answers
401 in the OpenAI error shape without it or with a wrong one on every route but /health/live, and
serves with it; one bound beyond loopback refuses to start without a credential."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest

from budrt.config import ModelServerConfig, Settings, runtime_dump
from budrt.server.heartbeat import Heartbeat
from budrt.server.main import is_loopback
from tests.procs import ROOT, stop
from tests.tiny_models import build_tiny_llama, start_server, tiny_config

KEY = "internal-test-credential-0123456789"
MODEL = "tiny-auth"
CHAT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
ROUTES = [  # every route of a model server but /health/live, with a body it accepts
    ("GET", "/health/ready", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL}", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": MODEL, "max_tokens": 2, "prompt": "hi"}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "hi"}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("auth")
    model = tiny_config(MODEL, build_tiny_llama(home / "tiny"))
    proc, url = start_server(home, [model], internal_key=KEY, self_test_interval_s=0)
    try:
        yield url
    finally:
        stop(proc)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_but_liveness_needs_the_internal_key(
    server: str, method: str, path: str, body: dict | None
) -> None:
    for auth in ({}, {"Authorization": "Bearer wrong-credential"}, {"Authorization": KEY}):
        resp = httpx.request(method, server + path, json=body, headers=auth, timeout=30)
        assert resp.status_code == 401, (path, auth, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert set(error) == {"message", "type", "param", "code"}
    resp = httpx.request(
        method, server + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    if path == "/v1/embeddings":  # a chat model: refused for what it is, not for who asks
        assert resp.status_code not in (401, 500), resp.text
    else:
        assert resp.status_code == 200, (path, resp.text)


def test_liveness_answers_anyone(server: str) -> None:
    assert httpx.get(server + "/health/live", timeout=10).status_code == 200


def test_the_heartbeat_self_check_carries_the_key(server: str) -> None:
    """A server registers with gateways only once its own /health/ready answers 200."""
    port = int(server.rsplit(":", 1)[1])
    config = ModelServerConfig(name="s", models=[], port=port)

    async def ready(key: str | None) -> bool:
        beat = Heartbeat(config, pool=None, internal_key=key)  # type: ignore[arg-type]
        beat._session = aiohttp.ClientSession()
        try:
            return await beat._ready()
        finally:
            await beat._session.close()

    assert asyncio.run(ready(KEY)) is True
    assert asyncio.run(ready(None)) is False


def test_a_server_beyond_loopback_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        models=[tiny_config(MODEL, tmp_path / "unused")],
        model_servers=[{"name": "s", "models": [MODEL], "host": "0.0.0.0", "port": 1}],
    )
    runtime = tmp_path / "runtime.json"
    runtime.write_bytes(runtime_dump(settings, servers=True))
    argv = [sys.executable, "-m", "budrt.server", "--runtime", str(runtime), "--name", "s"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "internal_key" in done.stderr and "0.0.0.0" in done.stderr
    assert "Traceback" not in done.stderr


def test_loopback_means_this_machine_only() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.5", "example.com"))


def test_a_short_internal_key_is_refused() -> None:
    with pytest.raises(ValueError, match="internal_key"):
        Settings(internal_key="short")
