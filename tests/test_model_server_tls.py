"""Model servers behind mutual TLS (`tls.enabled`): a real model-server process completes the
handshake only with a client holding a certificate from the platform's CA; the gateway presents
one, and refuses an upstream whose certificate does not name the host it dialled."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from budrt.config import DeploymentConfig, Settings
from budrt.security import certs
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.procs import start_gateway, stop
from tests.tiny_models import build_tiny_llama, start_server, tiny_config

KEY = "internal-test-credential-0123456789"
MODEL = "tiny-tls"
CHAT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
# The server certificate names 127.0.0.1 only: "localhost" reaches the same port under a name
# the certificate does not carry.
TLS = {"enabled": True, "hosts": ["127.0.0.1"]}


@dataclass
class Server:
    url: str
    home: Path
    paths: certs.CertPaths


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("mtls")
    model = tiny_config(MODEL, build_tiny_llama(home / "tiny"))
    proc, url = start_server(home, [model], internal_key=KEY, tls=TLS, self_test_interval_s=0)
    try:
        yield Server(url, home, certs.cert_paths(Settings(home=home, tls=TLS).tls, home))
    finally:
        stop(proc)


def _chat(url: str, verify: ssl.SSLContext | bool) -> httpx.Response:
    auth = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(url + "/v1/chat/completions", json=CHAT, headers=auth, verify=verify, timeout=60)


def test_a_client_with_the_platform_certificate_is_served(server: Server) -> None:
    assert server.url.startswith("https://")
    reply = _chat(server.url, certs.client_context(server.paths, with_client_cert=True))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_client_without_a_certificate_is_refused(server: Server) -> None:
    no_cert = certs.client_context(server.paths, with_client_cert=False)
    for path in ("/health/live", "/health/ready"):  # not even liveness: nothing past the handshake
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url + path, verify=no_cert, timeout=10)
    with pytest.raises(httpx.HTTPError):
        _chat(server.url, no_cert)


def test_a_certificate_from_another_ca_is_refused(server: Server, tmp_path: Path) -> None:
    other = certs.init(Settings(home=tmp_path).tls, tmp_path)  # another platform's CA
    context = certs.client_context(server.paths, with_client_cert=False)  # trusts the server
    context.load_cert_chain(other.client_cert, other.client_key)
    with pytest.raises(httpx.HTTPError):
        _chat(server.url, context)


def test_plain_http_gets_no_answer(server: Server) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url.replace("https://", "http://") + "/health/live", timeout=5)


def test_the_gateway_talks_mtls_and_refuses_a_name_the_certificate_lacks(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    settings = Settings(
        home=server.home,  # the same platform: the same CA and certificates
        secret_key="test-secret-test-secret",
        tls=TLS,
        deployments=[
            DeploymentConfig(model=MODEL, endpoints=[f"https://127.0.0.1:{port}/v1"], api_key=KEY),
            DeploymentConfig(model="misnamed", endpoints=[f"https://localhost:{port}/v1"], api_key=KEY),
        ],
        gateway={"retries": 0},
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("tls")
    proc, url = start_gateway(settings, server.home / "gateway.json")
    verify = certs.client_context(server.paths, with_client_cert=False)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, verify=verify) as c:
            reply = c.post("/v1/chat/completions", json=CHAT, timeout=60)
            assert reply.status_code == 200, reply.text
            refused = c.post("/v1/chat/completions", json={**CHAT, "model": "misnamed"}, timeout=60)
            assert refused.status_code in (502, 503), refused.text
        log = (server.home / "gateway.log").read_text()
        assert "ClientConnectorCertificateError" in log, log[-2000:]
    finally:
        stop(proc)
        store.db.dispose()
