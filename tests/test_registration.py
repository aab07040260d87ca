"""Model servers that register with gateways by heartbeat: real gateway and model-server
processes, the openai SDK through the gateway, SIGKILL expiry, clean deregistration, balancing
over two registered servers, and the heartbeat endpoint's validation and authorization."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import openai
import pytest

from budrt.config import DeploymentConfig, ModelServerConfig, Settings, runtime_dump
from budrt.gateway.app import create_app
from budrt.gateway.routing import Router
from budrt.server.heartbeat import Heartbeat, advertise_url
from budrt.server.model_pool import ModelPool
from budrt.store.db import migrate
from budrt.store.identity import IdentityStore
from budrt.store.keys import KeyStore
from tests.mock_upstream import MockUpstream, ServerThread, free_port
from tests.procs import start_gateway, stop
from tests.tiny_models import build_tiny_llama, start_server, tiny_config

MODEL, ALIAS = "tiny-reg", "tiny-reg-alias"
HEARTBEAT = "/admin/replicas/heartbeat"
CHAT_PATH = "/v1/chat/completions"
FAST_S = 0.5  # heartbeat interval of the server that gets SIGKILLed: ttl 1.5 s
# The platform's internal credential: the registering servers require it, the gateways send it to
# registered replicas (requests and health checks), never a configured deployment's api_key.
INTERNAL_KEY = "registration-internal-key-0123456789"


@dataclass
class Fleet:
    gateways: list[str]
    admin: str
    registrar: str  # may only register tiny-* models
    developer: str
    home: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two gateways with no deployments configured, sharing one database."""
    home = tmp_path_factory.mktemp("gw")
    settings = Settings(
        home=home,
        secret_key="registration-test-secret-0123",
        internal_key=INTERNAL_KEY,
        deployments=[],
        model_servers=[],
        models=[],
        gateway={"health_interval_s": 0.25, "breaker_cooldown_s": 30.0, "retry_backoff_s": 0.001},
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    admin, _ = store.create("admin", role="admin")
    # The documented way: a custom role holding only `replicas:register` (here on tiny-* models).
    IdentityStore(store.db).create_role("model-server", ["replicas:register@model:tiny-*"], "test")
    registrar, _ = store.create("registrar", role="model-server")
    developer, _ = store.create("dev", role="developer")
    store.db.dispose()
    procs, urls = [], []
    try:
        for i in range(2):
            proc, url = start_gateway(settings, home / f"gateway{i}.json")
            procs.append(proc)
            urls.append(url)
        yield Fleet(urls, admin, registrar, developer, home)
    finally:
        for proc in procs:
            stop(proc)


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _replicas(fleet: Fleet, gateway: str) -> dict[str, list[str]]:
    with _client(gateway, fleet.admin) as c:
        resp = c.get("/admin/replicas")
    assert resp.status_code == 200, resp.text
    return {r["url"]: [m["id"] for m in r["models"]] for r in resp.json()["data"]}


def _wait_for(what: str, check: Callable[[], bool], limit_s: float) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < limit_s, f"{what}: not within {limit_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def _served(server_url: str) -> float:
    """Requests this model server finished for MODEL (its own Prometheus counter)."""
    auth = {"Authorization": f"Bearer {INTERNAL_KEY}"}
    text = httpx.get(server_url + "/metrics", headers=auth, timeout=10).text
    pattern = r'^budrt:request_success_total\{[^}]*model_name="' + MODEL + r'"[^}]*\} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.M))


def test_servers_register_serve_balance_expire_and_leave(fleet: Fleet, tmp_path: Path) -> None:
    model = tiny_config(MODEL, build_tiny_llama(tmp_path / "tiny"), aliases=[ALIAS])
    register = {
        "register_urls": fleet.gateways,
        "register_key": fleet.registrar,
        "self_test_interval_s": 0,
        "internal_key": INTERNAL_KEY,
    }
    gw = fleet.gateways[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    procs: list[subprocess.Popen] = []
    try:
        # A heartbeats fast (it will be SIGKILLed); B slowly (ttl 9 s: only a clean leave removes
        # it quickly). Both announce the model to both gateways.
        a_proc, a_url = start_server(tmp_path / "a", [model], heartbeat_interval_s=FAST_S, **register)
        procs.append(a_proc)
        a = a_url + "/v1"
        for g in fleet.gateways:
            _wait_for("A registered", lambda g=g: _replicas(fleet, g).get(a) == [MODEL], 10)

        sdk = openai.OpenAI(base_url=gw + "/v1", api_key=fleet.admin, max_retries=0, timeout=30)
        assert MODEL in [m.id for m in sdk.models.list()]
        for name in (MODEL, ALIAS):
            reply = sdk.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert reply.model == MODEL and reply.choices[0].message.content is not None
        streamed = list(
            sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
            )
        )
        assert streamed and streamed[0].model == MODEL

        b_proc, b_url = start_server(tmp_path / "b", [model], heartbeat_interval_s=3.0, **register)
        procs.append(b_proc)
        b = b_url + "/v1"
        _wait_for("B registered", lambda: set(_replicas(fleet, gw)) == {a, b}, 10)
        before = {a: _served(a_url), b: _served(b_url)}

        def one(_: int) -> None:
            reply = sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=8
            )
            assert reply.choices[0].finish_reason in ("stop", "length")

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(16)))
        assert _served(a_url) > before[a] and _served(b_url) > before[b]  # balanced over both

        # SIGKILL A: it can say nothing, so its registration expires within the ttl, and
        # requests meanwhile fail over to B.
        a_proc.send_signal(signal.SIGKILL)
        a_proc.wait(10)
        killed = time.monotonic()
        for _ in range(2):
            one(0)
        limit = 3 * FAST_S + 2.0  # the ttl, plus slack for a busy machine
        for g in fleet.gateways:
            _wait_for("A expired", lambda g=g: a not in _replicas(fleet, g), limit)
        assert time.monotonic() - killed < limit

        # SIGTERM B: it deregisters while shutting down, long before its 9 s ttl.
        b_proc.send_signal(signal.SIGTERM)
        b_proc.wait(15)
        assert b_proc.returncode in (0, -signal.SIGTERM)
        left = time.monotonic()
        for g in fleet.gateways:
            assert _replicas(fleet, g) == {}
        assert time.monotonic() - left < 2.0

        # No replica left: a clear 503 with Retry-After, at once (the model stays known).
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            sdk.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 503
        assert err.value.response.headers.get("retry-after") == "1"
        assert time.monotonic() - start < 5
    finally:
        for proc in procs:
            stop(proc)


def test_heartbeat_validation_and_authorization(fleet: Fleet) -> None:
    gw = fleet.gateways[0]
    url = "http://127.0.0.1:9/v1"  # nothing listens there; nothing is sent to it here
    good = {"url": url, "models": [{"id": "tiny-x", "aliases": ["tiny-x-alias"]}], "ttl_s": 60}
    with httpx.Client(base_url=gw, timeout=10) as anon:
        assert anon.post(HEARTBEAT, json=good).status_code == 401
        bad_key = {"Authorization": "Bearer budrt-not-a-real-key"}
        assert anon.post(HEARTBEAT, json=good, headers=bad_key).status_code == 401
    with _client(gw, fleet.developer) as dev:
        resp = dev.post(HEARTBEAT, json=good)
        assert resp.status_code == 403 and resp.json()["error"]["type"] == "permission_error"
        assert dev.get("/admin/replicas").status_code == 403
    with _client(gw, fleet.registrar) as reg:
        # The registrar's key is narrowed to tiny-*: not another model, nor an alias outside it.
        assert reg.post(HEARTBEAT, json={**good, "models": ["other"]}).status_code == 403
        aliased = {**good, "models": [{"id": "tiny-x", "aliases": ["gpt-4"]}]}
        assert reg.post(HEARTBEAT, json=aliased).status_code == 403
        assert reg.get("/admin/replicas").status_code == 403  # may register, not list

        cases = [
            ({"models": good["models"]}, "url"),
            ({**good, "url": "ftp://127.0.0.1/v1"}, "url"),
            ({**good, "url": "not a url"}, "url"),
            ({**good, "url": "http://127.0.0.1:99999/v1"}, "url"),
            ({"url": url}, "models"),
            ({**good, "models": []}, "models"),
            ({**good, "models": "tiny-x"}, "models"),
            ({**good, "models": [{"aliases": []}]}, "models[0].id"),
            ({**good, "models": [{"id": "tiny x"}]}, "models[0].id"),
            ({**good, "models": [{"id": "tiny-x", "aliases": "a"}]}, "models[0].aliases"),
            ({**good, "models": ["tiny-x", "tiny-x"]}, "models[1]"),
            ({**good, "ttl_s": 0}, "ttl_s"),
            ({**good, "ttl_s": "10"}, "ttl_s"),
            ({**good, "leaving": "yes"}, "leaving"),
        ]
        for body, param in cases:
            resp = reg.post(HEARTBEAT, json=body)
            assert resp.status_code == 400, (body, resp.text)
            error = resp.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
        resp = reg.post(HEARTBEAT, content=b"{not json", headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]

        # A valid one registers (a model no configuration names); shown in /v1/models.
        resp = reg.post(HEARTBEAT, json=good)
        assert resp.status_code == 200, resp.text
        assert resp.json()["models"] == ["tiny-x"] and resp.json()["ttl_s"] == 60
        assert _replicas(fleet, gw) == {url: ["tiny-x"]}
        with _client(gw, fleet.admin) as admin:
            assert "tiny-x" in [m["id"] for m in admin.get("/v1/models").json()["data"]]
            # An alias already taken by another deployment is a conflict, named by param.
            clash = {"url": "http://127.0.0.1:10/v1", "models": [{"id": "tiny-y", "aliases": ["tiny-x"]}]}
            resp = reg.post(HEARTBEAT, json=clash)
            assert resp.status_code == 409 and resp.json()["error"]["param"] == "models[0].aliases"
            resp = reg.post(HEARTBEAT, json={**clash, "models": [{"id": "tiny-x-alias"}]})
            assert resp.status_code == 409 and resp.json()["error"]["param"] == "models[0].id"

            row = admin.get("/admin/replicas").json()["data"][0]
            assert row["url"] == url and row["last_heartbeat"] < row["expires_at"]
            # Deregistration: DELETE by url (the admin), then it is unknown.
            assert admin.delete("/admin/replicas", params={"url": "nope"}).status_code == 400
            assert admin.delete("/admin/replicas", params={"url": url}).status_code == 200
            assert admin.delete("/admin/replicas", params={"url": url}).status_code == 404
        assert _replicas(fleet, gw) == {}
        # A leaving heartbeat is accepted even when nothing is registered (idempotent shutdown).
        assert reg.post(HEARTBEAT, json={"url": url, "leaving": True}).status_code == 200


def test_register_key_is_a_secret_masked_by_config_show() -> None:
    server = {"name": "s", "models": [], "register_urls": ["http://gw:8000"], "register_key": "budrt-xyz"}
    settings = Settings(models=[], model_servers=[server], deployments=[])
    assert settings.masked()["model_servers"][0]["register_key"] == "**********"
    restored = Settings.model_validate_json(runtime_dump(settings))  # what a child process gets
    key = restored.model_servers[0].register_key
    assert key is not None and key.get_secret_value() == "budrt-xyz"
    assert ModelServerConfig(name="s", models=[]).register_urls == []  # off by default


def test_a_stream_in_flight_finishes_after_its_replica_expires(tmp_path: Path) -> None:
    """An external OpenAI-compatible upstream registered by hand with a short ttl: when its
    heartbeats stop, new requests get 503 while a stream already relaying runs to [DONE]."""
    settings = Settings(
        home=tmp_path, secret_key="registration-test-secret-0123", models=[], model_servers=[]
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("admin", role="admin")
    upstream = ServerThread(MockUpstream("ext").app).start()
    gateway = ServerThread(create_app(settings, key_store=store)).start()
    try:
        with _client(gateway.url, key) as c:
            beat = {"url": upstream.url + "/v1", "models": ["ext-model"], "ttl_s": 0.6}
            assert c.post(HEARTBEAT, json=beat).status_code == 200
            body = {"model": "ext-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            with c.stream(
                "POST", "/v1/chat/completions", json={**body, "mock_chunks": 8, "mock_delay": 0.2}
            ) as r:
                assert r.status_code == 200
                lines = []
                for line in r.iter_lines():
                    lines += [line] if line else []
                    if len(lines) == 2:  # mid-stream, past the ttl: the replica is out of routing
                        time.sleep(0.7)
                        late = c.post("/v1/chat/completions", json={**body, "stream": False})
                        assert late.status_code == 503 and late.headers["retry-after"] == "1"
            assert lines[-1] == "data: [DONE]" and sum(x.startswith("data: {") for x in lines) == 9
    finally:
        gateway.stop()
        upstream.stop()
        store.db.dispose()


def test_registered_endpoints_keep_weights_and_the_hash_ring_in_step() -> None:
    deps = [
        DeploymentConfig(
            model="w", endpoints=["http://a/v1", "http://b/v1"], strategy="weighted_rr", weights=[3, 1]
        ),
        DeploymentConfig(model="h", endpoints=["http://a/v1"], strategy="affinity"),
    ]
    router = Router(deps)
    w, h = router.resolve("w"), router.resolve("h")
    assert w is not None and h is not None
    c = w.add_endpoint("http://c/v1", weight=4)
    picks = [w.pick().base_url for _ in range(80)]
    assert picks.count("http://a/v1") == 30 and picks.count("http://c/v1") == 40  # 3:1:4
    assert w.remove_endpoint(w.endpoints[0]) and not w.remove_endpoint(w.endpoints[0].__class__("x", False))
    assert [e.index for e in w.endpoints] == [0, 1] and w.weights == [1, 4]
    assert {w.pick().base_url for _ in range(10)} == {"http://b/v1", "http://c/v1"}
    h.add_endpoint("http://z/v1")
    owners = {h.pick(key=f"prompt {i}").base_url for i in range(50)}
    assert owners == {"http://a/v1", "http://z/v1"}  # the ring includes the new replica
    c.expires = 0.0  # stopped heartbeating
    assert c not in {w.pick() for _ in range(10)}  # unroutable at once, before the sweep
    assert router.expire() == [(w, c)] and [e.base_url for e in w.endpoints] == ["http://b/v1"]


def test_heartbeat_failures_are_logged_once_and_never_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway that is down, and one that refuses the key: the server logs each problem once
    per change and carries on; nothing registers."""
    settings = Settings(
        home=tmp_path, secret_key="registration-test-secret-0123", models=[], model_servers=[]
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    gateway = ServerThread(create_app(settings, key_store=store)).start()
    dead = f"http://127.0.0.1:{free_port()}"
    model = tiny_config("tiny-z", tmp_path / "unused", aliases=["z"])
    server = ModelServerConfig(
        name="s",
        models=["tiny-z"],
        port=1234,
        register_urls=[dead, gateway.url + "/v1"],
        register_key="budrt-bad",
    )
    assert advertise_url(server) == "http://127.0.0.1:1234/v1"
    assert (
        advertise_url(server.model_copy(update={"advertise_url": "http://h:{port}/v1/"}))
        == "http://h:1234/v1"
    )

    async def scenario() -> Heartbeat:
        hb = Heartbeat(server, ModelPool([model]))
        hb._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=hb.timeout_s))  # as run()
        assert hb.models() == [{"id": "tiny-z", "aliases": ["z"], "state": "available", "pinned": False}]
        for _ in range(3):
            await hb.beat()
        await hb.close()  # the leaving heartbeat fails the same way, and still returns
        return hb

    try:
        with caplog.at_level("WARNING", logger="budrt.server.heartbeat"):
            hb = asyncio.run(scenario())
    finally:
        gateway.stop()
        store.db.dispose()
    assert hb.registered == set()
    failures = [r for r in caplog.records if r.getMessage() == "heartbeat to gateway failed"]
    errors = sorted(r.fields["error"][:8] for r in failures)  # type: ignore[attr-defined]
    assert len(failures) == 2 and errors[1] == "HTTP 401", errors  # once per gateway, not per beat


def _gateway_for(
    tmp_path: Path, deployments: list[DeploymentConfig], **gateway: object
) -> tuple[ServerThread, str]:
    """An in-process gateway with `deployments` configured; returns it and an admin key."""
    settings = Settings(
        home=tmp_path,
        secret_key="registration-test-secret-0123",
        models=[],
        model_servers=[],
        deployments=deployments,
        gateway={"health_interval_s": 0.1, **gateway},
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("admin", role="admin")
    store.db.dispose()
    return ServerThread(create_app(settings, key_store=store)).start(), key


def _chat_body(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def test_registered_replicas_never_get_a_configured_key_nor_join_uninvited(tmp_path: Path) -> None:
    configured, joiner = MockUpstream("configured"), MockUpstream("joiner")
    servers = [ServerThread(configured.app).start(), ServerThread(joiner.app).start()]
    a, b = (s.url + "/v1" for s in servers)
    deployments = [
        DeploymentConfig(
            model="open",
            endpoints=[a],
            api_key="sk-open-secret",
            allow_registration=True,
            strategy="weighted_rr",
        ),
        DeploymentConfig(model="locked", endpoints=[a], api_key="sk-locked-secret"),
    ]
    gateway, key = _gateway_for(tmp_path, deployments)
    try:
        with _client(gateway.url, key) as c:
            resp = c.post(HEARTBEAT, json={"url": b, "models": ["locked"]})
            assert resp.status_code == 409 and resp.json()["error"]["param"] == "models[0].id", resp.text
            resp = c.post(HEARTBEAT, json={"url": b, "models": ["fresh", "locked"]})
            assert resp.status_code == 409 and resp.json()["error"]["param"] == "models[1].id"
            assert c.get("/v1/models/fresh").status_code == 404  # nothing of a refused beat applies
            # A configured deployment that allows it: joined, but its names stay the configuration's.
            beat = {"url": b, "models": [{"id": "open", "aliases": ["open-extra"]}]}
            assert c.post(HEARTBEAT, json=beat).status_code == 200
            assert c.get("/v1/models/open-extra").status_code == 404
            served = {c.post(CHAT_PATH, json=_chat_body("open")).json()["served_by"] for _ in range(6)}
            assert served == {"configured", "joiner"}
            for _ in range(2):
                assert c.post(CHAT_PATH, json=_chat_body("locked")).json()["served_by"] == "configured"
        assert configured.last_headers["authorization"] == "Bearer sk-locked-secret"
        assert joiner.requests > 0 and "authorization" not in joiner.last_headers
    finally:
        gateway.stop()
        for s in servers:
            s.stop()


def test_registered_urls_must_lead_inside_the_allowed_networks(tmp_path: Path) -> None:
    up = MockUpstream("named")
    server = ServerThread(up.app).start()
    (tmp_path / "default").mkdir()
    default, key = _gateway_for(tmp_path / "default", [])
    narrow, narrow_key = _gateway_for(tmp_path, [], registration_cidrs=["127.0.0.0/8"])
    try:
        with _client(default.url, key) as c:
            # Cloud metadata, "any address" (which reaches this host), also spelled as IPv6.
            for url in (
                "http://169.254.169.254/v1",
                "http://0.0.0.0:9/v1",
                "http://[::ffff:169.254.169.254]/v1",
                "http://[::ffff:a9fe:a9fe]:80/v1",
            ):
                resp = c.post(HEARTBEAT, json={"url": url, "models": ["meta"]})
                assert resp.status_code == 403, (url, resp.text)
                error = resp.json()["error"]
                assert error["param"] == "url" and error["code"] == "url_not_allowed", error
            resp = c.post(HEARTBEAT, json={"url": "http://no-such-host.invalid/v1", "models": ["x"]})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "url"
            assert c.get("/admin/replicas").json()["data"] == []
        with _client(narrow.url, narrow_key) as c:
            resp = c.post(HEARTBEAT, json={"url": "http://10.1.2.3:8000/v1", "models": ["x"]})
            assert resp.status_code == 403  # private, but not in this gateway's list
            # A host name is checked by what it resolves to, and pinned to that address.
            named = f"http://localhost:{server.port}/v1"
            assert c.post(HEARTBEAT, json={"url": named, "models": ["named"], "ttl_s": 60}).status_code == 200
            [row] = c.get("/admin/replicas").json()["data"]
            assert row["url"] == named and row["connect_url"] == f"http://127.0.0.1:{server.port}/v1"
            assert c.post(CHAT_PATH, json=_chat_body("named")).json()["served_by"] == "named"
            assert up.last_headers["host"] == f"localhost:{server.port}"
    finally:
        default.stop()
        narrow.stop()
        server.stop()


def test_empty_registered_deployments_are_dropped(tmp_path: Path) -> None:
    up = MockUpstream("up")
    server = ServerThread(up.app).start()
    gateway, key = _gateway_for(tmp_path, [DeploymentConfig(model="conf", endpoints=[server.url + "/v1"])])
    url = server.url + "/v1"
    try:
        with _client(gateway.url, key) as c:

            def listed() -> set[str]:
                return {m["id"] for m in c.get("/v1/models").json()["data"]}

            for round_ in range(3):  # each round's models are new: without dropping, the table grows
                models = [{"id": f"dyn-{round_}-{i}", "aliases": [f"alias-{round_}-{i}"]} for i in range(20)]
                assert c.post(HEARTBEAT, json={"url": url, "models": models, "ttl_s": 1}).status_code == 200
                assert len(listed()) == 21
                for m in models[:5]:
                    assert c.post(CHAT_PATH, json=_chat_body(m["id"])).status_code == 200
                _wait_for("expired and dropped", lambda: listed() == {"conf"}, 8)
                assert c.get(f"/v1/models/alias-{round_}-0").status_code == 404
                assert c.post(CHAT_PATH, json=_chat_body(f"dyn-{round_}-0")).status_code == 404
            # Leaving, or no longer listing a model, drops it the same way (after the ttl).
            beat = {"url": url, "models": ["keep", "gone"], "ttl_s": 0.3}
            assert c.post(HEARTBEAT, json=beat).status_code == 200
            assert c.post(HEARTBEAT, json={**beat, "models": ["keep"], "ttl_s": 10}).status_code == 200
            _wait_for("unlisted model dropped", lambda: listed() == {"conf", "keep"}, 5)
            assert c.post(HEARTBEAT, json={**beat, "models": ["keep"], "ttl_s": 1}).status_code == 200
            assert c.post(HEARTBEAT, json={"url": url, "leaving": True}).status_code == 200
            assert c.post(CHAT_PATH, json=_chat_body("keep")).status_code == 503  # known a while
            _wait_for("left model dropped", lambda: listed() == {"conf"}, 5)
        # Nothing kept per model name that came and went (one read timeout: one entry).
        assert len(gateway.server.config.app.state.gateway.proxy._timeouts) == 1
    finally:
        gateway.stop()
        server.stop()


def test_aliases_a_replica_adds_are_bounded(tmp_path: Path) -> None:
    gateway, key = _gateway_for(tmp_path, [])
    url = "http://127.0.0.1:9/v1"  # nothing listens; nothing is sent to it here
    try:
        with _client(gateway.url, key) as c:
            many = [f"a{i}" for i in range(33)]
            resp = c.post(HEARTBEAT, json={"url": url, "models": [{"id": "many", "aliases": many}]})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "models[0].aliases"
            beat = {"url": url, "models": [{"id": "many", "aliases": many[:32]}], "ttl_s": 60}
            assert c.post(HEARTBEAT, json=beat).status_code == 200
            # Aliases stay while the deployment lives: new ones, beat after beat, must not pile up.
            beat = {**beat, "models": [{"id": "many", "aliases": many[1:]}]}
            resp = c.post(HEARTBEAT, json=beat)
            assert resp.status_code == 409 and resp.json()["error"]["param"] == "models[0].aliases"
            assert c.get("/v1/models/a32").status_code == 404 and c.get("/v1/models/a31").status_code == 200
    finally:
        gateway.stop()
