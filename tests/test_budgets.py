"""Limits beyond the key: the user's and team's (keys and JWTs), the model's, and budgets per
calendar period (tokens, images), in process and shared by two gateway processes through Redis."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from budrt.config import DeploymentConfig, Settings
from budrt.gateway.app import create_app
from budrt.gateway.ratelimit import periods
from budrt.store.db import migrate
from budrt.store.identity import IdentityStore
from budrt.store.keys import KeyStore
from budrt.store.quotas import period_usage
from tests.mock_upstream import ServerThread
from tests.procs import RedisServer, start_gateway, stop

CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"
EMBEDDINGS = "/v1/embeddings"
JWT_SECRET = "budget-test-secret-0123456789-0123456789"


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def _chat(request: Request) -> Response:
    raw = await request.body()
    body = orjson.loads(raw)
    await asyncio.sleep(float(body.get("mock_delay", 0)))
    # Usage equal to what the gateway reserves (body bytes / 4 + max_tokens): no refund, so
    # exactly budget // reservation requests fit, however they interleave.
    prompt, completion = len(raw) // 4, int(body.get("max_tokens", 0))
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    return _json({"id": "c", "object": "chat.completion", "choices": [choice], "usage": usage})


async def _images(request: Request) -> Response:
    body = orjson.loads(await request.body())
    await asyncio.sleep(float(body.get("mock_delay", 0)))
    if body.get("mock") == "fail":
        return _json({"error": {"message": "mock says no", "type": "invalid_request_error"}}, 400)
    return _json({"created": 1, "data": [{"b64_json": "AA=="}] * int(body.get("n", 1))})


async def _embeddings(request: Request) -> Response:
    raw = await request.body()
    usage = {"prompt_tokens": len(raw) // 4, "total_tokens": len(raw) // 4}  # what the gateway reserves
    return _json({"object": "list", "data": [{"embedding": [0.0], "index": 0}], "usage": usage})


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", _chat, methods=["POST"]),
            Route("/v1/images/generations", _images, methods=["POST"]),
            Route("/v1/embeddings", _embeddings, methods=["POST"]),
        ]
    )
    server = ServerThread(app).start()
    yield server.url + "/v1"
    server.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def _settings(home: Path, upstream: str, **extra: Any) -> Settings:
    deployments = [
        DeploymentConfig(model="m", endpoints=[upstream]),
        DeploymentConfig(model="rated", endpoints=[upstream], rpm=2),
        DeploymentConfig(model="single", endpoints=[upstream], max_concurrent=1),
        DeploymentConfig(model="img", endpoints=[upstream]),
    ]
    return Settings(home=home, secret_key="test-secret-test-secret", deployments=deployments, **extra)


def _chat_body(max_tokens: int = 10, **extra: Any) -> bytes:
    return orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}
    )


def _reserved(body: bytes) -> int:
    """What the gateway reserves (and the upstream above reports as used) for `body`."""
    return len(body) // 4 + orjson.loads(body)["max_tokens"]


class Gateway:
    """An in-process gateway (real HTTP on a thread) over a fresh database."""

    def __init__(self, settings: Settings, store: KeyStore | None = None) -> None:
        migrate(settings.database_url_resolved)
        self.store = store or KeyStore.from_settings(settings)
        self.identity = IdentityStore(self.store.db)
        self.settings = settings
        self.server = ServerThread(create_app(settings, key_store=self.store)).start()

    def post(self, key: str, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        return httpx.post(self.server.url + path, content=content, headers=headers, timeout=30)

    def call(self, key: str, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.request(method, self.server.url + path, json=body, headers=headers, timeout=30)

    def restart(self) -> None:
        self.server.stop()  # the lifespan flushes the usage records
        self.server = ServerThread(create_app(self.settings, key_store=self.store)).start()

    def close(self) -> None:
        self.server.stop()
        self.store.db.dispose()


@pytest.fixture()
def gateway(tmp_path: Path, upstream: str) -> Iterator[Gateway]:
    g = Gateway(_settings(tmp_path, upstream, auth={"jwt": {"secret": JWT_SECRET}}))
    yield g
    g.close()


def _refused(resp: httpx.Response, code: str, text: str) -> None:
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["code"] == code and text in error["message"], error
    assert int(resp.headers["retry-after"]) >= 1


def test_user_and_team_limits_are_shared_by_their_keys(gateway: Gateway) -> None:
    admin, _ = gateway.store.create("admin", role="admin")
    body = _chat_body(100)
    team_tpm = 3 * _reserved(body) + _reserved(body) // 2  # three requests fit, a fourth does not
    assert (
        gateway.call(admin, "POST", "/admin/teams", {"name": "ml", "tpm": team_tpm}).json()["tpm"] == team_tpm
    )
    alice = gateway.call(
        admin, "POST", "/admin/users", {"name": "alice", "team": "ml", "rpm": 3, "roles": ["developer"]}
    )
    assert alice.status_code == 201 and alice.json()["rpm"] == 3
    assert (
        gateway.call(
            admin, "POST", "/admin/users", {"name": "bob", "team": "ml", "roles": ["developer"]}
        ).status_code
        == 201
    )
    keys = [
        gateway.call(admin, "POST", "/admin/keys", {"name": n, "user": u}).json()["key"]
        for n, u in (("a1", "alice"), ("a2", "alice"), ("b1", "bob"))
    ]
    a1, a2, b1 = keys

    # Alice's rpm counts both her keys.
    assert [gateway.post(k, CHAT, body).status_code for k in (a1, a2, a1)] == [200, 200, 200]
    _refused(gateway.post(a2, CHAT, body), "rate_limit_exceeded", "3 requests per minute for this user")
    # The team's tpm counts all its users: alice used three reservations, bob's does not fit.
    _refused(gateway.post(b1, CHAT, body), "rate_limit_exceeded", "tokens per minute for this team")

    # Changed through the admin API, applied at once.
    assert gateway.call(admin, "PATCH", "/admin/teams/ml", {"tpm": None}).json()["tpm"] is None
    assert gateway.post(b1, CHAT, body).status_code == 200
    assert gateway.call(admin, "PATCH", "/admin/users/alice", {"rpm": None}).status_code == 200
    assert gateway.post(a1, CHAT, body).status_code == 200

    bad = gateway.call(admin, "PATCH", "/admin/users/alice", {"rpmm": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpmm"
    assert gateway.call(admin, "PATCH", "/admin/users/alice", {"tpm": -1}).status_code == 400
    assert gateway.call(admin, "PATCH", "/admin/teams/nope", {"tpm": 5}).status_code == 404
    assert gateway.call(a1, "PATCH", "/admin/teams/ml", {"tpm": 5}).status_code == 403


def test_jwt_principal_gets_its_users_limits(gateway: Gateway) -> None:
    gateway.identity.create_user("carol", None, ["developer"], "test", {"rpm": 2})
    token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60, "roles": ["developer"]}, JWT_SECRET)
    assert [gateway.post(token, CHAT, _chat_body()).status_code for _ in range(2)] == [200, 200]
    _refused(
        gateway.post(token, CHAT, _chat_body()), "rate_limit_exceeded", "2 requests per minute for this user"
    )


def test_model_limits_hold_across_callers(gateway: Gateway) -> None:
    k1, _ = gateway.store.create("k1")
    k2, _ = gateway.store.create("k2")
    rated = orjson.dumps({"model": "rated", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert gateway.post(k1, CHAT, rated).status_code == 200
    assert gateway.post(k2, CHAT, rated).status_code == 200
    _refused(gateway.post(k1, CHAT, rated), "rate_limit_exceeded", "2 requests per minute for this model")
    assert gateway.post(k1, CHAT, _chat_body()).status_code == 200  # other models are not affected

    slow = {
        "model": "single",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 1,
        "mock_delay": 0.5,
    }
    with ThreadPoolExecutor(2) as pool:
        codes = sorted(r.status_code for r in pool.map(lambda k: gateway.post(k, CHAT, slow), (k1, k2)))
    assert codes == [200, 429]


def test_token_budget_per_day_survives_a_restart(gateway: Gateway) -> None:
    body = _chat_body(20)
    key, record = gateway.store.create("budget", budgets={"tokens_per_day": 3 * _reserved(body)})
    assert record.tokens_per_day == 3 * _reserved(body)
    assert [gateway.post(key, CHAT, body).status_code for _ in range(2)] == [200, 200]
    gateway.restart()  # in process: the new limiter starts from today's recorded usage
    assert gateway.post(key, CHAT, body).status_code == 200
    refused = gateway.post(key, CHAT, body)
    _refused(refused, "insufficient_quota", "You exceeded your current quota")
    assert refused.json()["error"]["type"] == "insufficient_quota"
    assert "tokens per day for this key" in refused.json()["error"]["message"]
    to_midnight = periods(time.time())[2] - time.time()
    assert abs(int(refused.headers["retry-after"]) - math.ceil(to_midnight)) <= 2


def test_key_limits_change_through_the_admin_api(gateway: Gateway) -> None:
    admin, _ = gateway.store.create("admin", role="admin")
    created = gateway.call(admin, "POST", "/admin/keys", {"name": "k", "rpm": 1}).json()
    key, key_id = created["key"], created["id"]
    assert gateway.post(key, CHAT, _chat_body()).status_code == 200
    _refused(
        gateway.post(key, CHAT, _chat_body()), "rate_limit_exceeded", "1 requests per minute for this key"
    )
    changed = gateway.call(admin, "PATCH", f"/admin/keys/{key_id}", {"rpm": None, "tokens_per_day": 10})
    assert changed.status_code == 200 and (changed.json()["rpm"], changed.json()["tokens_per_day"]) == (
        None,
        10,
    )
    # Applied at once: no rpm any more, and the new day budget holds (a reservation above the
    # whole budget is admitted while it is unused, as for tpm; then the budget is spent).
    assert gateway.post(key, CHAT, _chat_body()).status_code == 200
    _refused(gateway.post(key, CHAT, _chat_body()), "insufficient_quota", "tokens per day for this key")
    assert gateway.call(admin, "PATCH", f"/admin/keys/{key_id}", {"tokens_per_day": None}).status_code == 200
    assert gateway.post(key, CHAT, _chat_body()).status_code == 200
    assert gateway.call(admin, "PATCH", f"/admin/keys/{key_id}", {"rpm": 0}).status_code == 400
    assert gateway.call(key, "PATCH", f"/admin/keys/{key_id}", {"rpm": None}).status_code == 403
    assert gateway.call(admin, "DELETE", f"/admin/keys/{key_id}").status_code == 200
    assert gateway.call(admin, "PATCH", f"/admin/keys/{key_id}", {"rpm": 5}).status_code == 404
    audit = gateway.call(admin, "GET", "/admin/audit").json()["data"]
    assert any(entry["action"] == "keys:update" and entry["target"] == f"key:{key_id}" for entry in audit)


def test_image_budget_counts_n_and_refunds_failures(gateway: Gateway) -> None:
    admin, _ = gateway.store.create("admin", role="admin")
    created = gateway.call(
        admin, "POST", "/admin/keys", {"name": "img", "images_per_day": 3, "tokens_per_day": 5}
    )
    assert created.status_code == 201 and created.json()["images_per_day"] == 3
    key = created.json()["key"]
    assert gateway.post(key, IMAGES, {"model": "img", "prompt": "a cat", "n": 2}).status_code == 200
    _refused(
        gateway.post(key, IMAGES, {"model": "img", "prompt": "a cat", "n": 2}),
        "insufficient_quota",
        "3 images per day",
    )
    # A failed generation gives its images back.
    assert gateway.post(key, IMAGES, {"model": "img", "prompt": "x", "mock": "fail"}).status_code == 400
    assert gateway.post(key, IMAGES, {"model": "img", "prompt": "a cat"}).status_code == 200
    _refused(
        gateway.post(key, IMAGES, {"model": "img", "prompt": "a cat"}), "insufficient_quota", "images per day"
    )


def test_two_gateways_sharing_redis_admit_exactly_the_budget(
    tmp_path: Path, upstream: str, redis_server: RedisServer
) -> None:
    settings = _settings(tmp_path, upstream, gateway={"redis_url": redis_server.url})
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    body = _chat_body(10, mock_delay=0.2)  # requests overlap: reservations race for the budget
    tokens_key, _ = store.create("tokens", budgets={"tokens_per_day": 10 * _reserved(body)})
    images_key, _ = store.create("images", budgets={"images_per_month": 7})
    gateways = [start_gateway(settings, tmp_path / f"runtime{i}.json") for i in range(2)]
    try:
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        clients = [httpx.Client(base_url=url, timeout=30, limits=no_reuse) for _, url in gateways]
        image = orjson.dumps({"model": "img", "prompt": "a cat", "mock_delay": 0.1})

        def one(i: int) -> httpx.Response:
            key, path, content = (tokens_key, CHAT, body) if i % 4 < 2 else (images_key, IMAGES, image)
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            return clients[i % 2].post(path, content=content, headers=headers)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(one, range(80)))
        for c in clients:
            c.close()
        chats = [r for i, r in enumerate(responses) if i % 4 < 2]
        images = [r for i, r in enumerate(responses) if i % 4 >= 2]
        assert [r.status_code for r in chats].count(200) == 10, [r.status_code for r in chats]
        assert [r.status_code for r in images].count(200) == 7, [r.status_code for r in images]
        # Both gateways admitted some of each: one budget, not one per process.
        assert {i % 2 for i, r in enumerate(responses) if r.status_code == 200 and i % 4 < 2} == {0, 1}
        for r in responses:
            if r.status_code != 200:
                _refused(r, "insufficient_quota", "You exceeded your current quota")
    finally:
        for proc, _ in gateways:
            stop(proc)
        store.db.dispose()


def test_cli_sets_limits_and_budgets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from budrt.cli.app import app

    monkeypatch.setenv("BUDRT_HOME", str(tmp_path))
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, [*args, "--home", str(tmp_path)])
        assert result.exit_code == 0, result.output
        return result.stdout

    team = json.loads(
        cli("teams", "create", "--name", "ml", "--tpm", "1000", "--tokens-per-month", "9000", "--json")
    )
    assert (team["tpm"], team["tokens_per_month"]) == (1000, 9000)
    cli("users", "create", "--name", "alice", "--team", "ml", "--rpm", "5")
    assert "images_per_day=4" in cli("users", "set-limits", "alice", "--rpm", "0", "--images-per-day", "4")
    assert "tpm=1000" in cli("teams", "set-limits", "ml", "--tokens-per-month", "0")
    flags = (
        "--tokens-per-day",
        "100",
        "--tokens-per-month",
        "2000",
        "--images-per-day",
        "3",
        "--images-per-month",
        "30",
    )
    key = json.loads(cli("keys", "create", "--name", "k", "--user", "alice", *flags, "--json"))
    budgets = [key[f] for f in ("tokens_per_day", "tokens_per_month", "images_per_day", "images_per_month")]
    assert budgets == [100, 2000, 3, 30]
    changed = json.loads(
        cli("keys", "set-limits", str(key["id"]), "--tokens-per-day", "0", "--rpm", "7", "--json")
    )
    assert (changed["tokens_per_day"], changed["rpm"], changed["tokens_per_month"]) == (None, 7, 2000)
    users = json.loads(cli("users", "list", "--json"))
    assert (users[0]["rpm"], users[0]["images_per_day"]) == (None, 4)
    bad = runner.invoke(
        app, ["keys", "create", "--name", "x", "--tokens-per-day", "0", "--home", str(tmp_path)]
    )
    assert bad.exit_code == 2


def test_embeddings_reserve_their_input_only(gateway: Gateway) -> None:
    """Embeddings generate nothing: `max_tokens` and `n` (any value) do not count."""
    key, _ = gateway.store.create("emb", tpm=1000, budgets={"tokens_per_day": 1000})
    body = orjson.dumps({"model": "m", "input": "hello", "max_tokens": 10**9, "n": 10**6})
    for _ in range(3):
        resp = gateway.post(key, EMBEDDINGS, body)
        assert resp.status_code == 200, resp.text
        assert int(resp.headers["x-ratelimit-remaining-tokens"]) >= 1000 - 3 * (len(body) // 4) - 1
    ignored = gateway.post(key, EMBEDDINGS, {"model": "m", "input": "x", "max_tokens": "many", "n": True})
    assert ignored.status_code == 200, ignored.text


def test_image_count_must_be_a_positive_integer(gateway: Gateway) -> None:
    """The model server may read "3" or 2.0 as a number: the image budget must count the same."""
    key, _ = gateway.store.create("img-n", budgets={"images_per_day": 3})
    for n in ("3", True, 0, -1, 2.5, [2]):
        resp = gateway.post(key, IMAGES, {"model": "img", "prompt": "a cat", "n": n})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "n", (n, resp.text)
    for n in (2**64 - 1, 1e30):  # more than the budget: refused, and nothing is charged
        _refused(
            gateway.post(key, IMAGES, {"model": "img", "prompt": "a cat", "n": n}), "insufficient_quota", ""
        )
    assert gateway.post(key, IMAGES, {"model": "img", "prompt": "a cat", "n": 2.0}).status_code == 200
    _refused(gateway.post(key, IMAGES, {"model": "img", "prompt": "a cat", "n": 2}), "insufficient_quota", "")
    assert gateway.post(key, IMAGES, {"model": "img", "prompt": "a cat"}).status_code == 200


def test_redis_outage_keeps_budgets_through_the_gateway(tmp_path: Path, upstream: str) -> None:
    """Redis stops mid-test: a request with a budget fails closed (503) by default, plain rate
    limits fail open; with budget_fail_mode "open" the fallback starts from the usage records."""
    redis = RedisServer().start()
    settings = _settings(tmp_path, upstream, gateway={"redis_url": redis.url})
    lenient = settings.model_copy(deep=True)
    lenient.gateway.ratelimit.budget_fail_mode = "open"
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    body = _chat_body(20)
    budgeted, record = store.create("budget", budgets={"tokens_per_day": 3 * _reserved(body)})
    plain, _ = store.create("plain", rpm=100)
    strict_gw, lenient_gw = Gateway(settings, store), Gateway(lenient, store)
    try:
        assert [strict_gw.post(budgeted, CHAT, body).status_code for _ in range(2)] == [200, 200]
        deadline = time.monotonic() + 10  # metered (in batches): both requests are on record
        start = datetime.fromtimestamp(periods(time.time())[0] * 86400, UTC)
        while period_usage(store.db, f"key:{record.id}", start)[0] < 2 * _reserved(body):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        redis.stop()
        refused = strict_gw.post(budgeted, CHAT, body)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "rate_limiter_unavailable"
        assert strict_gw.post(plain, CHAT, body).status_code == 200
        assert lenient_gw.post(budgeted, CHAT, body).status_code == 200  # the third of three
        _refused(lenient_gw.post(budgeted, CHAT, body), "insufficient_quota", "tokens per day")
    finally:
        strict_gw.close()
        lenient_gw.server.stop()
        redis.stop()
