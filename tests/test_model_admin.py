"""Loading, unloading and pinning models through the gateway (`POST /admin/replicas/models/{model}/
load|unload|pin`), onto a real model server (`POST /admin/models/{model}/...`): real processes over
HTTP, the tiny random models, a memory budget for two of the three.

The model server registers with the gateway by heartbeat; a second, in-process gateway reaches the
same server as a configured `managed` deployment (what `budrt serve` sets up). The tests run in
file order and share the server; each one that depends on what is resident starts from `reset`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from budrt.config import DeploymentConfig, Settings
from budrt.gateway.app import create_app
from budrt.server.cost import estimate_cost
from budrt.store.db import migrate
from budrt.store.identity import IdentityStore
from budrt.store.keys import KeyStore
from tests.mock_upstream import ServerThread, free_port
from tests.procs import start_gateway, stop
from tests.tiny_models import build_tiny_llama, start_server, tiny_config

NAMES = ["tiny-a", "tiny-b", "tiny-c"]  # the budget holds two of them
INTERNAL_KEY = "model-admin-internal-key-0123456789"
ACTIONS = ("load", "unload", "pin")
CALLERS = ("admin", "developer", "viewer", "none")
CHAT = "/v1/chat/completions"


@dataclass
class Env:
    gateway: str
    server: str  # the model server's root URL
    replica: str  # its OpenAI base URL: how /admin/replicas lists it
    keys: dict[str, str]  # caller -> key ("none": no key)
    home: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    home = tmp_path_factory.mktemp("gw")
    settings = Settings(
        home=home,
        secret_key="model-admin-test-secret-0123",
        internal_key=INTERNAL_KEY,
        deployments=[],
        model_servers=[],
        models=[],
        gateway={"health_interval_s": 0.25},
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    keys = {role: store.create(role, role=role)[0] for role in ("admin", "developer", "viewer")}
    IdentityStore(store.db).create_role("a-keeper", ["models:manage@model:tiny-a"], "test")
    keys["keeper"] = store.create("keeper", role="a-keeper")[0]
    store.db.dispose()
    root = tmp_path_factory.mktemp("models")
    models = [tiny_config(name, build_tiny_llama(root / name, seed=i)) for i, name in enumerate(NAMES)]
    cost = estimate_cost(models[0], Path(models[0].source))
    gw_proc, gw_url = start_gateway(settings, home / "gateway.json")
    procs = [gw_proc]
    try:
        server_proc, server_url = start_server(
            tmp_path_factory.mktemp("server"),
            models,
            internal_key=INTERNAL_KEY,
            memory_budget_bytes=int(cost * 2.5),
            self_test_interval_s=0,
            register_urls=[gw_url],
            register_key=keys["admin"],
            heartbeat_interval_s=0.5,
        )
        procs.append(server_proc)
        e = Env(gw_url, server_url, server_url + "/v1", keys, home)
        wait_for("registered", lambda: set(listed(e)) == set(NAMES), 15)
        yield e
    finally:
        for proc in reversed(procs):
            stop(proc)


def headers(e: Env, who: str) -> dict[str, str]:
    return {} if who == "none" else {"Authorization": f"Bearer {e.keys[who]}"}


def act(
    e: Env, model: str, action: str, body: Any = None, who: str = "admin", **params: str
) -> httpx.Response:
    path = f"/admin/replicas/models/{model}/{action}"
    content = None if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
    with httpx.Client(base_url=e.gateway, headers=headers(e, who), timeout=60) as c:
        return c.post(path, content=content, params=params)


def acted(e: Env, model: str, action: str, body: Any = None) -> dict[str, Any]:
    """The single replica's row of an admin's action that the gateway answered with 200."""
    resp = act(e, model, action, body)
    assert resp.status_code == 200, resp.text
    [row] = resp.json()["replicas"]
    assert row["replica"] == e.replica
    return row


def listed(e: Env) -> dict[str, dict[str, Any]]:
    """The server's models as the gateway's /admin/replicas shows them."""
    with httpx.Client(base_url=e.gateway, headers=headers(e, "admin"), timeout=10) as c:
        rows = c.get("/admin/replicas").json()["data"]
    return {m["id"]: m for r in rows if r["url"] == e.replica for m in r["models"]}


def cards(e: Env) -> dict[str, dict[str, Any]]:
    """The models as the model server itself shows them."""
    auth = {"Authorization": f"Bearer {INTERNAL_KEY}"}
    data = httpx.get(f"{e.server}/v1/models", headers=auth, timeout=10).json()["data"]
    return {m["id"]: m for m in data}


def states(e: Env) -> list[str]:
    now = cards(e)
    return [now[n]["state"] for n in NAMES]


def wait_for(what: str, check: Callable[[], bool], limit_s: float = 20) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {limit_s} s"
        time.sleep(0.05)


def resident(e: Env, model: str) -> None:
    wait_for(f"{model} resident", lambda: cards(e)[model]["state"] == "resident")


def chat(e: Env, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(e.gateway + CHAT, json=body, headers=headers(e, "admin"), timeout=60)


def reset(e: Env) -> None:
    """Nothing pinned, nothing resident (a model still loading is waited for, then unloaded)."""
    for name in NAMES:
        assert acted(e, name, "pin", {"pinned": False})["ok"]
    for name in NAMES:
        wait_for(f"{name} unloaded", lambda name=name: acted(e, name, "unload")["status"] == 200)
    assert states(e) == ["available"] * 3


def test_load_through_the_gateway(env: Env) -> None:
    reset(env)
    row = acted(env, "tiny-a", "load")
    assert row["ok"] and row["status"] in (200, 202) and row["error"] is None, row
    assert row["model"]["id"] == "tiny-a" and row["model"]["state"] in ("loading", "resident")
    resident(env, "tiny-a")
    again = acted(env, "tiny-a", "load")  # already resident: 200, nothing loaded twice
    assert again["status"] == 200 and again["model"]["state"] == "resident" and again["model"]["loads"] == 1
    assert again["model"]["device"] == "cpu" and again["model"]["memory_bytes"] > 0
    wait_for("listed resident", lambda: listed(env)["tiny-a"]["state"] == "resident", 5)
    assert listed(env)["tiny-b"]["state"] == "available"
    # Audited like every admin change: actor, action, target, and what the replica answered.
    with httpx.Client(base_url=env.gateway, headers=headers(env, "admin"), timeout=10) as c:
        entries = c.get("/admin/audit", params={"limit": 20}).json()["data"]
    loads = [x for x in entries if x["action"] == "models:load" and x["target"] == "model:tiny-a"]
    assert loads and loads[0]["actor"].startswith("key:")
    assert loads[0]["detail"]["replicas"] == {env.replica: 200}


def test_a_pinned_model_is_never_evicted_to_make_room(env: Env) -> None:
    reset(env)
    row = acted(env, "tiny-a", "pin", {"pinned": True})
    assert row["status"] == 200 and row["model"]["pinned"] is True
    assert listed(env)["tiny-a"]["pinned"] is True  # at once: the gateway took the server's answer
    for name in ("tiny-a", "tiny-b"):
        acted(env, name, "load")
        resident(env, name)
    loads = cards(env)["tiny-a"]["loads"]
    # c needs a room: a is the least recently used, but pinned; b goes.
    assert acted(env, "tiny-c", "load")["ok"]
    resident(env, "tiny-c")
    assert states(env) == ["resident", "available", "resident"]
    # A request for b through the gateway loads it the same way: c goes, a stays.
    assert chat(env, "tiny-b").status_code == 200
    assert states(env) == ["resident", "resident", "available"]
    # With a and b both pinned, c's load is refused, naming them; nothing is evicted for it.
    acted(env, "tiny-b", "pin", {"pinned": True})
    refused = act(env, "tiny-c", "load").json()
    assert refused["ok"] is False
    [row] = refused["replicas"]
    assert row["status"] == 409 and row["error"]["code"] == "pinned_model_in_the_way", row
    assert "`tiny-a`" in row["error"]["message"] and "`tiny-b`" in row["error"]["message"]
    assert states(env) == ["resident", "resident", "failed"]
    assert chat(env, "tiny-c").json()["error"]["code"] == "pinned_model_in_the_way"
    # The server keeps announcing c (only pinned models keep it out), so it can still be managed.
    wait_for("c listed failed", lambda: listed(env).get("tiny-c", {}).get("state") == "failed", 5)
    # Unpinned, b is evictable again: c's load evicts it.
    assert acted(env, "tiny-b", "pin", {"pinned": False})["model"]["pinned"] is False
    assert acted(env, "tiny-c", "load")["ok"]
    resident(env, "tiny-c")
    assert states(env) == ["resident", "available", "resident"]
    assert cards(env)["tiny-a"]["loads"] == loads  # a was never evicted (nor loaded again)
    wait_for("listed", lambda: listed(env)["tiny-a"]["pinned"] and not listed(env)["tiny-b"]["pinned"], 5)


def test_unload_refuses_a_pinned_or_busy_model(env: Env) -> None:
    reset(env)
    acted(env, "tiny-a", "load")
    resident(env, "tiny-a")
    acted(env, "tiny-a", "pin", {"pinned": True})
    row = acted(env, "tiny-a", "unload")
    assert row["status"] == 409 and row["error"]["code"] == "model_pinned", row
    acted(env, "tiny-a", "pin", {"pinned": False})
    row = acted(env, "tiny-a", "unload")
    assert row["status"] == 200 and row["model"]["state"] == "available" and row["model"]["device"] is None
    assert acted(env, "tiny-a", "unload")["status"] == 200  # not resident: nothing to do
    wait_for("listed available", lambda: listed(env)["tiny-a"]["state"] == "available", 5)
    # A model serving a stream is not unloaded under it (409); once the stream ends, it is.
    body = {
        "model": "tiny-b",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
        "messages": [{"role": "user", "content": "a long story"}],
    }
    with (
        httpx.Client(timeout=120, headers=headers(env, "admin")) as client,
        client.stream("POST", env.gateway + CHAT, json=body) as stream,
    ):
        assert stream.status_code == 200
        chunks = stream.iter_bytes()
        assert next(chunks)
        row = acted(env, "tiny-b", "unload")
        assert row["status"] == 409 and row["error"]["code"] == "model_busy", row
        assert row["model"] is None and "1 request" in row["error"]["message"]
    # Hanging up ends the stream (the gateway closes its upstream, the server aborts it).
    assert cards(env)["tiny-b"]["state"] == "resident"
    wait_for("b idle", lambda: cards(env)["tiny-b"]["in_flight"] == 0, 10)
    assert acted(env, "tiny-b", "unload")["status"] == 200
    assert chat(env, "tiny-b").status_code == 200  # an unloaded model loads again on demand


def test_unknown_models_and_bad_bodies(env: Env) -> None:
    for action in ACTIONS:
        body = {"pinned": True} if action == "pin" else None
        resp = act(env, "no-such-model", action, body)
        assert resp.status_code == 404, resp.text
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "model_not_found" and error["param"] == "model"
    cases: list[tuple[str, Any, dict[str, str], str | None]] = [
        ("pin", None, {}, "pinned"),
        ("pin", {}, {}, "pinned"),
        ("pin", {"pinned": "yes"}, {}, "pinned"),
        ("pin", {"pinned": 1}, {}, "pinned"),
        ("pin", {"pinned": True, "force": True}, {}, "force"),
        ("load", {"bogus": 1}, {}, "bogus"),
        ("unload", {"pinned": False}, {}, "pinned"),
        ("load", {"replica": "not a url"}, {}, "replica"),
        ("load", {"replica": 5}, {}, "replica"),
        ("unload", None, {"replica": "ftp://x/v1"}, "replica"),
        ("load", {"replica": "http://127.0.0.1:9/v1"}, {"replica": "http://127.0.0.1:10/v1"}, "replica"),
        ("load", b"{not json", {}, None),
        ("load", b"[1]", {}, None),
    ]
    for action, body, params, param in cases:
        resp = act(env, "tiny-a", action, body, **params)
        assert resp.status_code == 400, (action, body, resp.text)
        assert resp.json()["error"]["param"] == param, (action, body, resp.text)
    # A replica that does not host the model: 404 naming `replica`.
    resp = act(env, "tiny-a", "load", replica="http://127.0.0.1:9/v1")
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "replica", resp.text
    assert resp.json()["error"]["code"] == "replica_not_found"
    # A heartbeat's `state` and `pinned` are checked like the rest of it.
    with httpx.Client(base_url=env.gateway, headers=headers(env, "admin"), timeout=10) as c:
        for field, value in (("state", ["resident"]), ("state", "gone"), ("pinned", "yes")):
            model = {"id": "tiny-x", field: value}
            beat = {"url": "http://127.0.0.1:9/v1", "models": [model]}
            resp = c.post("/admin/replicas/heartbeat", json=beat)
            assert resp.status_code == 400 and resp.json()["error"]["param"] == f"models[0].{field}"
    # The model server's own routes: the same errors, and nothing without the internal credential.
    auth = {"Authorization": f"Bearer {INTERNAL_KEY}"}
    with httpx.Client(base_url=env.server, headers=auth, timeout=10) as c:
        resp = c.post("/admin/models/no-such-model/load")
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
        resp = c.post("/admin/models/tiny-a/pin", json={"pinned": "no"})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "pinned"
        resp = c.post("/admin/models/tiny-a/pin", json={"pinned": False, "x": 1})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "x"
    for action in ACTIONS:
        resp = httpx.post(f"{env.server}/admin/models/tiny-a/{action}", json={"pinned": True}, timeout=10)
        assert resp.status_code == 401, resp.text
        wrong = {"Authorization": "Bearer not-the-internal-key"}
        resp = httpx.post(f"{env.server}/admin/models/tiny-a/{action}", json={"pinned": True}, headers=wrong)
        assert resp.status_code == 401
    assert cards(env)["tiny-a"]["pinned"] is False  # none of the refused pins took


def test_a_failing_replica_is_reported_not_a_500(env: Env) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with httpx.Client(base_url=env.gateway, headers=headers(env, "admin"), timeout=30) as c:
        beat = {"url": dead, "models": ["tiny-a"], "ttl_s": 60}
        assert c.post("/admin/replicas/heartbeat", json=beat).status_code == 200
        try:
            resp = c.post("/admin/replicas/models/tiny-a/pin", json={"pinned": False})
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            assert answer["ok"] is False and answer["model"] == "tiny-a" and answer["pinned"] is False
            rows = {r["replica"]: r for r in answer["replicas"]}
            assert set(rows) == {env.replica, dead}
            assert rows[env.replica]["ok"] and rows[env.replica]["status"] == 200
            failed = rows[dead]
            assert failed["ok"] is False and failed["status"] is None and failed["model"] is None
            assert failed["error"]["code"] == "replica_unreachable", failed
            # Naming one replica (query or body) calls that one only.
            one = c.post("/admin/replicas/models/tiny-a/pin", json={"pinned": False, "replica": env.replica})
            assert [r["replica"] for r in one.json()["replicas"]] == [env.replica] and one.json()["ok"]
            one = c.post("/admin/replicas/models/tiny-a/unload", params={"replica": dead})
            assert [r["replica"] for r in one.json()["replicas"]] == [dead]
        finally:
            assert c.delete("/admin/replicas", params={"url": dead}).status_code == 200


def test_only_admins_manage_models(env: Env) -> None:
    """Every route against every built-in role (and no key, and a role scoped to one model)."""
    with httpx.Client(base_url=env.gateway, headers=headers(env, "admin"), timeout=10) as c:
        before = {x["id"] for x in c.get("/admin/audit", params={"limit": 1000}).json()["data"]}
    expected = {"admin": 200, "developer": 403, "viewer": 403, "none": 401}
    for action in ACTIONS:
        body = {"pinned": False} if action == "pin" else None
        for who in CALLERS:
            for model in ("tiny-c", "no-such-model"):
                resp = act(env, model, action, body, who=who)
                want = 404 if who == "admin" and model == "no-such-model" else expected[who]
                assert resp.status_code == want, (action, who, model, resp.text)
                if want >= 400:
                    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
                if want == 403:
                    assert resp.json()["error"]["type"] == "permission_error"
        # `models:manage@model:tiny-a`: that model, no other.
        assert act(env, "tiny-a", action, body, who="keeper").status_code == 200
        assert act(env, "tiny-b", action, body, who="keeper").status_code == 403
    with httpx.Client(base_url=env.gateway, headers=headers(env, "admin"), timeout=10) as c:
        entries = c.get("/admin/audit", params={"limit": 1000}).json()["data"]
    new = [x for x in entries if x["id"] not in before]
    # One entry per allowed call (admin on tiny-c, the keeper on tiny-a); none for a refused one.
    assert sorted((x["action"], x["target"]) for x in new) == sorted(
        [(f"models:{a}", "model:tiny-c") for a in ACTIONS]
        + [(f"models:{a}", "model:tiny-a") for a in ACTIONS]
    )


def test_a_managed_deployment_is_managed_with_its_own_credential(env: Env, tmp_path: Path) -> None:
    """As `budrt serve` configures its gateway: the server as a `managed` endpoint carrying the
    internal key as the deployment's `api_key`; a configured external upstream cannot be managed."""
    settings = Settings(
        home=tmp_path,
        secret_key="model-admin-test-secret-0123",
        models=[],
        model_servers=[],
        deployments=[
            DeploymentConfig(model="tiny-a", endpoints=[env.replica], api_key=INTERNAL_KEY, managed=True),
            DeploymentConfig(model="tiny-b", endpoints=[env.replica], api_key=INTERNAL_KEY),
        ],
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("admin", role="admin")
    gateway = ServerThread(create_app(settings, key_store=store)).start()
    try:
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            resp = c.post("/admin/replicas/models/tiny-a/pin", json={"pinned": True})
            assert resp.status_code == 200 and resp.json()["ok"], resp.text
            assert resp.json()["replicas"][0]["model"]["pinned"] is True
            assert cards(env)["tiny-a"]["pinned"] is True
            assert c.post("/admin/replicas/models/tiny-a/pin", json={"pinned": False}).json()["ok"]
            resp = c.post("/admin/replicas/models/tiny-b/load")
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "replica_not_found"
            # The plain listing shows registered replicas only; detail=full adds the configured
            # ones, with each budrt server's own view of its models.
            assert c.get("/admin/replicas").json()["data"] == []
            rows = c.get("/admin/replicas", params={"detail": "full"}).json()["data"]
            [row] = [r for r in rows if r["url"] == env.replica]
            assert row["source"] == "supervisor" and {m["id"] for m in row["models"]} == {"tiny-a", "tiny-b"}
            live = {card["id"]: card for card in row["live"]}
            assert live["tiny-a"]["pinned"] is False and "kv_cache_usage" in live["tiny-a"]
            assert {"running", "waiting", "memory_bytes", "state"} <= set(live["tiny-a"])
    finally:
        gateway.stop()
        store.db.dispose()
