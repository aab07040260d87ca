"""The gateway over HTTPS (`tls.enabled`): a real `budrt gateway` process with the platform's
certificates, reached by the openai SDK trusting the platform CA; plain HTTP, an untrusted CA
and a name outside the certificate are refused."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from budrt.config import DeploymentConfig, Settings
from budrt.security import certs
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.e2e.conftest import ADMIN_KEY
from tests.procs import start_gateway, start_upstream, stop
from tests.test_recovery import Serve, start_serve, stop_serve
from tests.tiny_models import build_tiny_llama


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, certs.CertPaths]]:
    home = tmp_path_factory.mktemp("tls")
    upstream, upstream_url = start_upstream("up")
    settings = Settings(
        home=home,
        secret_key="test-secret-test-secret",
        deployments=[DeploymentConfig(model="m", endpoints=[upstream_url])],
        tls={"enabled": True},
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("tls")
    proc, url = start_gateway(settings, home / "runtime.json")
    try:
        yield url, key, certs.cert_paths(settings.tls, home)
    finally:
        stop(proc)
        stop(upstream)
        store.db.dispose()


def test_the_sdk_talks_to_the_gateway_over_tls(gateway: tuple[str, str, certs.CertPaths]) -> None:
    url, key, paths = gateway
    assert url.startswith("https://")
    trusted = httpx.Client(verify=certs.client_context(paths, with_client_cert=False))
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, http_client=trusted)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
        tls = certs.client_context(paths, with_client_cert=False).wrap_socket(
            raw, server_hostname="127.0.0.1"
        )
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tls.close()


def test_plain_http_to_the_tls_port_gets_no_answer(gateway: tuple[str, str, certs.CertPaths]) -> None:
    url, key, _ = gateway
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https://", "http://") + "/health/live", timeout=5)


def test_a_client_that_does_not_trust_the_ca_is_refused(
    gateway: tuple[str, str, certs.CertPaths], tmp_path: Path
) -> None:
    url, _, paths = gateway
    with pytest.raises(httpx.ConnectError):  # the system's roots do not include the platform CA
        httpx.get(url + "/health/live", timeout=5)
    other = certs.init(Settings(home=tmp_path).tls, tmp_path)  # another platform's CA
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health/live", timeout=5, verify=certs.client_context(other, with_client_cert=False))
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLCertVerificationError):
        context = certs.client_context(paths, with_client_cert=False)
        context.wrap_socket(raw, server_hostname="not-in-the-certificate.example")


def _states(serve: Serve) -> dict[str, tuple[str | None, bool, str]]:
    """Each process's (state, answered its readiness, URL) as `budrt status` sees them: the
    supervisor's state, and `budrt status`'s own probe, over TLS with the client certificate."""
    processes = serve.status()["processes"]
    return {p["name"]: (p.get("state"), p.get("health", {}).get("ready", False), p["url"]) for p in processes}


def test_budrt_serve_runs_every_hop_over_tls(tmp_path: Path) -> None:
    """One flag, `--tls`: the gateway serves HTTPS, the model server takes only mutual TLS from
    the gateway and the supervisor's probes, an external upstream keeps its own HTTP."""
    upstream, upstream_url = start_upstream("up")
    config = {
        "models": [
            {
                "name": "tiny",
                "task": "chat",
                "format": "safetensors",
                "source": str(build_tiny_llama(tmp_path / "tiny")),
                "dtype": "float32",
                "max_model_len": 128,
                "kv_cache_bytes": 4 << 20,
            }
        ],
        "model_servers": [{"name": "text", "models": ["tiny"], "self_test_interval_s": 0}],
        "deployments": [{"model": "m", "endpoints": [upstream_url]}],
    }
    serve = start_serve(tmp_path, config, flags=("--tls",))
    try:
        deadline = time.monotonic() + 90
        while {(state, ready) for state, ready, _ in _states(serve).values()} != {("ready", True)}:
            assert serve.proc.poll() is None and time.monotonic() < deadline, serve.log_tail()
            time.sleep(0.3)
        assert {url.split(":")[0] for _, _, url in _states(serve).values()} == {"https"}
        paths = certs.cert_paths(Settings(home=tmp_path).tls, tmp_path)
        https = serve.url.replace("http://", "https://")
        verify = certs.client_context(paths, with_client_cert=False)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for model in ("m", "tiny"):
            chat = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            reply = httpx.post(
                https + "/v1/chat/completions", json=chat, headers=headers, verify=verify, timeout=60
            )
            assert reply.status_code == 200, reply.text
    finally:
        stop_serve(serve)
        stop(upstream)
