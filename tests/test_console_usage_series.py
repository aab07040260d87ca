"""The usage series behind the console's charts: `bucket_rows` (buckets, error counts,
percentiles, missing time to first byte) and `GET /admin/usage/series` through the gateway app
over httpx.ASGITransport: its bounds (400s) and whose rows each caller gets (admin: everyone's;
a developer or viewer key: its own key's; a key with a team-scoped role: its team's, and 403
for another team's)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from budrt.config import Settings
from budrt.gateway.app import create_app
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from budrt.store.usage import Usage, UsageStore, bucket_rows

SERIES = "/admin/usage/series"
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)  # a minute boundary, well in the past
TEAM_READER = ["usage:read:own", "usage:read:team"]


def _row(
    at: datetime,
    group: Any = "m",
    status: int = 200,
    latency: float = 10.0,
    ttft: float | None = None,
    prompt: int = 1,
    completion: int = 2,
    images: int = 0,
) -> tuple[Any, ...]:
    """A row as `UsageStore.series` reads it."""
    return (at, group, status, prompt, completion, images, latency, ttft)


# -- bucket_rows --


def test_buckets_align_on_start_not_on_the_clock() -> None:
    start = T0 + timedelta(seconds=30)  # buckets run from :30 to :30
    rows = [
        _row(start),
        _row(start + timedelta(seconds=59.9)),
        _row(start + timedelta(seconds=60)),
        _row(start + timedelta(seconds=185)),
    ]
    points = bucket_rows(rows, start, 60)
    origin = start.timestamp()
    assert [(p["t"], p["requests"]) for p in points] == [(origin, 2), (origin + 60, 1), (origin + 180, 1)]


def test_naive_times_are_utc() -> None:
    """SQLite gives back times without a zone: they are UTC, as they were written."""
    naive = (T0 + timedelta(seconds=90)).replace(tzinfo=None)
    points = bucket_rows([_row(naive)], T0, 60)
    assert [p["t"] for p in points] == [T0.timestamp() + 60]


def test_sums_and_errors_per_bucket_and_group() -> None:
    rows = [
        _row(T0, "a", 200, prompt=3, completion=4),
        _row(T0, "a", 429, prompt=5, completion=0),
        _row(T0, "a", 500, prompt=0, completion=0),
        _row(T0, "a", 399),
        _row(T0, "b", 200, images=2, prompt=0, completion=0),
        _row(T0, None, 404),
    ]
    points = {p["group"]: p for p in bucket_rows(rows, T0, 60)}
    a = points["a"]
    assert (a["requests"], a["errors"], a["prompt_tokens"], a["completion_tokens"]) == (4, 2, 9, 6)
    assert (points["b"]["images"], points["b"]["errors"]) == (2, 0)
    assert (points[None]["requests"], points[None]["errors"]) == (1, 1)  # a request of no model


def test_ordered_by_bucket_then_group() -> None:
    rows = [_row(T0 + timedelta(seconds=61), "b"), _row(T0, "b"), _row(T0, "a"), _row(T0, None)]
    points = bucket_rows(rows, T0, 60)
    # None sorts as "None": before lower-case names
    assert [(p["t"] - T0.timestamp(), p["group"]) for p in points] == [
        (0, None),
        (0, "a"),
        (0, "b"),
        (60, "b"),
    ]


def test_nearest_rank_percentiles() -> None:
    rows = [_row(T0, latency=float(v), ttft=float(v) / 10) for v in range(100, 0, -1)]  # any order
    (point,) = bucket_rows(rows, T0, 60)
    assert (point["latency_ms_p50"], point["latency_ms_p95"]) == (51.0, 96.0)
    assert (point["ttft_ms_p50"], point["ttft_ms_p95"]) == (5.1, 9.6)
    (one,) = bucket_rows([_row(T0, latency=7.25)], T0, 60)
    assert one["latency_ms_p50"] == one["latency_ms_p95"] == 7.25


def test_ttft_none_is_left_out_not_counted_as_zero() -> None:
    rows = [
        _row(T0, latency=5.0, ttft=None),
        _row(T0, latency=6.0, ttft=40.0),
        _row(T0, latency=7.0, ttft=None),
    ]
    (point,) = bucket_rows(rows, T0, 60)
    assert point["ttft_ms_p50"] == point["ttft_ms_p95"] == 40.0
    assert point["latency_ms_p50"] == 6.0  # latency counts every row
    (none,) = bucket_rows([_row(T0, ttft=None), _row(T0, ttft=None)], T0, 60)
    assert none["ttft_ms_p50"] is None and none["ttft_ms_p95"] is None


def test_no_rows_no_points() -> None:
    assert bucket_rows([], T0, 60) == []


# -- the endpoint --


class Loop:
    """An event loop in a thread: the app's lifespan stays open across the module's tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@dataclass
class World:
    loop: Loop
    client: httpx.AsyncClient
    keys: dict[str, str]  # caller -> plaintext key
    ids: dict[str, int]  # caller -> key id

    def get(self, who: str | None, path: str, **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return self.loop.run(self.client.get(path, params=params, headers=headers))

    def series(self, who: str, **params: Any) -> dict[str, Any]:
        resp = self.get(who, SERIES, **params)
        assert resp.status_code == 200, resp.text
        return resp.json()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    s = Settings(
        home=tmp_path_factory.mktemp("series"),
        secret_key="test-secret-test-secret",
        models=[],
        model_servers=[],
    )
    migrate(s.database_url_resolved)
    store = KeyStore.from_settings(s)
    app = create_app(s, key_store=store)
    loop = Loop()
    lifespan = app.router.lifespan_context(app)
    loop.run(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
    admin, admin_record = store.create("admin", role="admin")
    w = World(loop, client, {"admin": admin}, {"admin": admin_record.id})

    async def setup() -> None:
        auth = {"Authorization": f"Bearer {admin}"}
        for path, body in [
            ("/admin/teams", {"name": "research"}),
            ("/admin/teams", {"name": "ops"}),
            ("/admin/roles", {"name": "team-reader", "permissions": TEAM_READER}),
        ]:
            resp = await client.post(path, json=body, headers=auth)
            assert resp.status_code == 201, resp.text
        for who, body in [
            ("dev", {"name": "dev", "role": "developer"}),
            ("viewer", {"name": "viewer", "role": "viewer"}),
            ("lead", {"name": "lead", "role": "team-reader", "team": "research"}),
        ]:
            resp = await client.post("/admin/keys", json=body, headers=auth)
            assert resp.status_code == 201, resp.text
            w.keys[who], w.ids[who] = resp.json()["key"], resp.json()["id"]

    loop.run(setup())
    UsageStore(store.db).insert(_usage(w.ids))
    yield w
    loop.run(client.aclose())
    loop.run(lifespan.__aexit__(None, None, None))
    loop.close()
    store.db.dispose()


# (caller or None, team, model, seconds after T0, status, ttft): whose row is whose
ROWS: list[tuple[str | None, str | None, str, float, int, float | None]] = [
    ("admin", None, "chat-a", 5, 200, 30.0),
    ("dev", None, "chat-a", 10, 200, 20.0),
    ("dev", None, "chat-a", 70, 500, None),
    ("viewer", None, "chat-b", 15, 200, 50.0),
    ("lead", "research", "chat-b", 20, 200, None),
    (None, "research", "chat-a", 25, 429, 10.0),  # a token holder of research (no key)
    (None, "ops", "chat-a", 30, 200, 60.0),
]


def _usage(ids: dict[str, int]) -> list[Usage]:
    return [
        Usage(
            at=T0 + timedelta(seconds=offset),
            key_id=ids[who] if who else None,
            user=None if who else f"{team}-member",
            team=team,
            model=model,
            endpoint="chat",
            prompt_tokens=10,
            completion_tokens=5,
            latency_ms=100.0 + i,
            status=status,
            cache_hit=False,
            request_id=f"row-{i}",
            ttft_ms=ttft,
        )
        for i, (who, team, model, offset, status, ttft) in enumerate(ROWS)
    ]


WINDOW = {"start": T0.isoformat(), "end": (T0 + timedelta(minutes=5)).isoformat()}


def _requests(body: dict[str, Any]) -> int:
    return sum(p["requests"] for p in body["data"])


def test_series_shape_and_buckets(world: World) -> None:
    body = world.series("admin", group_by="model", bucket_s="60", **WINDOW)
    assert (body["object"], body["group_by"], body["bucket_s"]) == ("usage.series", "model", 60)
    assert datetime.fromisoformat(body["start"]) == T0
    points = {(p["t"] - T0.timestamp(), p["group"]): p for p in body["data"]}
    assert set(points) == {(0, "chat-a"), (0, "chat-b"), (60, "chat-a")}
    a = points[(0, "chat-a")]
    assert (a["requests"], a["errors"], a["prompt_tokens"], a["completion_tokens"]) == (4, 1, 40, 20)
    assert (a["ttft_ms_p50"], a["ttft_ms_p95"]) == (30.0, 60.0)  # 10, 20, 30, 60
    late = points[(60, "chat-a")]
    assert (late["requests"], late["errors"], late["ttft_ms_p50"], late["ttft_ms_p95"]) == (1, 1, None, None)
    assert late["latency_ms_p50"] == late["latency_ms_p95"] == 102.0
    for point in body["data"]:  # every field the charts read
        assert set(point) >= {"t", "group", "requests", "errors", "images", "latency_ms_p95", "ttft_ms_p95"}


def test_one_bucket_a_day_and_each_grouping(world: World) -> None:
    day = {"start": "2026-03-01T00:00:00Z", "end": "2026-03-31T00:00:00Z", "bucket_s": "86400"}
    body = world.series("admin", group_by="team", **day)
    day2 = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
    assert {(p["t"], p["group"], p["requests"]) for p in body["data"]} == {
        (day2, None, 4),
        (day2, "research", 2),
        (day2, "ops", 1),
    }
    keys = {p["group"]: p["requests"] for p in world.series("admin", group_by="key", **day)["data"]}
    assert keys == {
        world.ids["admin"]: 1,
        world.ids["dev"]: 2,
        world.ids["viewer"]: 1,
        world.ids["lead"]: 1,
        None: 2,
    }
    users = {p["group"] for p in world.series("admin", group_by="user", **day)["data"]}
    assert users == {None, "research-member", "ops-member"}


def test_default_window_is_the_last_hour_by_minute(world: World) -> None:
    body = world.series("admin")
    start, end = datetime.fromisoformat(body["start"]), datetime.fromisoformat(body["end"])
    assert (body["group_by"], body["bucket_s"], end - start) == ("model", 60, timedelta(hours=1))
    assert body["data"] == []  # T0 is long before


def test_too_many_buckets_is_a_400(world: World) -> None:
    start = T0.isoformat()
    fits = world.get("admin", SERIES, start=start, end=(T0 + timedelta(minutes=2000)).isoformat())
    assert fits.status_code == 200, fits.text
    over = world.get("admin", SERIES, start=start, end=(T0 + timedelta(minutes=2001)).isoformat())
    assert over.status_code == 400 and over.json()["error"]["param"] == "start", over.text
    days = world.get(
        "admin", SERIES, bucket_s="86400", start=start, end=(T0 + timedelta(days=2001)).isoformat()
    )
    assert days.status_code == 400, days.text


def test_bad_parameters_are_400s(world: World) -> None:
    for params, param in [
        ({"group_by": "endpoint"}, "group_by"),
        ({"group_by": "model;drop"}, "group_by"),
        ({"bucket_s": "-5"}, "bucket_s"),
        ({"bucket_s": "1m"}, "bucket_s"),
        ({"start": "yesterday"}, "start"),
        ({**WINDOW, "end": WINDOW["start"]}, "start"),  # an empty window
    ]:
        resp = world.get("admin", SERIES, **params)
        assert resp.status_code == 400, (params, resp.text)
        assert resp.json()["error"]["param"] == param, (params, resp.text)


def test_no_key_is_a_401(world: World) -> None:
    assert world.get(None, SERIES, **WINDOW).status_code == 401


def test_admin_sees_everyone(world: World) -> None:
    assert _requests(world.series("admin", **WINDOW)) == len(ROWS)
    ops = world.series("admin", team="ops", group_by="team", **WINDOW)
    assert [(p["group"], p["requests"]) for p in ops["data"]] == [("ops", 1)]


@pytest.mark.parametrize("who", ["dev", "viewer"])
def test_a_key_with_usage_read_own_sees_its_own_key_only(world: World, who: str) -> None:
    body = world.series(who, group_by="key", **WINDOW)
    assert {p["group"] for p in body["data"]} == {world.ids[who]}
    assert _requests(body) == sum(1 for row in ROWS if row[0] == who)
    # Asking for a team changes nothing: it reads its own rows or nothing.
    assert _requests(world.series(who, team="ops", **WINDOW)) == _requests(body)


def test_a_team_reader_sees_its_team_only(world: World) -> None:
    body = world.series("lead", group_by="team", **WINDOW)
    assert {p["group"] for p in body["data"]} == {"research"}
    assert _requests(body) == sum(1 for row in ROWS if row[1] == "research")
    same = world.series("lead", group_by="team", team="research", **WINDOW)
    assert same["data"] == body["data"]
    other = world.get("lead", SERIES, team="ops", **WINDOW)
    assert other.status_code == 403, other.text
    assert other.json()["error"]["code"] == "permission_denied"
