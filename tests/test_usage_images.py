"""Image usage in the metadata DB: revision 0007's columns, spooled records old and new, reports
and the image budgets seeded from the usage records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic import command
from sqlalchemy import inspect, text

from budrt.gateway.metering import _images, _tokens, _usage
from budrt.store.database import Database
from budrt.store.db import alembic_config, make_engine, migrate
from budrt.store.quotas import IMAGE_ENDPOINT, period_usage
from budrt.store.usage import Usage, UsageStore

NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)


def test_0007_adds_the_columns_and_old_rows_read_zero(database_url: str) -> None:
    url = database_url
    engine = make_engine(url, immediate=True)
    with engine.begin() as conn:  # the schema as an older budrt left it, with a row in it
        cfg = alembic_config(url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
        conn.execute(
            text(
                "INSERT INTO usage_records (at, endpoint, prompt_tokens, completion_tokens, latency_ms,"
                " status, cache_hit, request_id) VALUES (:at, 'chat', 3, 4, 1.0, 200, false, 'old-1')"
            ),
            {"at": NOW},
        )
    engine.dispose()
    migrate(url)
    engine = make_engine(url)
    try:
        columns = {c["name"]: c for c in inspect(engine).get_columns("usage_records")}
        for name in ("images", "pixels", "steps"):
            assert columns[name]["nullable"] is False, name
        with engine.connect() as conn:
            assert conn.execute(text("SELECT images, pixels, steps FROM usage_records")).one() == (0, 0, 0)
    finally:
        engine.dispose()


def test_spooled_records_old_and_new() -> None:
    old = ["b-1", NOW.timestamp(), 7, "alice", "ml", "m", "chat", 5, 2, 1.5, 200, False]  # 12 fields
    row = _usage(old)
    assert row is not None and (row.prompt_tokens, row.images, row.pixels, row.steps) == (5, 0, 0, 0)
    new = [*old[:6], IMAGE_ENDPOINT, 9, 0, 80.0, 200, False, 2, 2 * 64 * 64, 40]
    row = _usage(new)
    assert row is not None and (row.endpoint, row.images, row.pixels, row.steps) == ("image", 2, 8192, 40)
    assert row.at == NOW and row.request_id == "b-1"
    for broken in (old[:11], [*old, 1], [*old, 1, 2], {"id": 1}, "text"):
        assert _usage(broken) is None, broken  # type: ignore[arg-type]


def test_usage_numbers_from_both_apis() -> None:
    chat = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    image = {"input_tokens": 9, "output_tokens": 0, "total_tokens": 9}
    image |= {"images": 2, "pixels": 8192, "steps": 40}
    assert _tokens(chat) == (5, 2) and _images(chat) == (0, 0, 0)
    assert _tokens(image) == (9, 0) and _images(image) == (2, 8192, 40)
    assert _tokens(None) == (0, 0) and _images({}) == (0, 0, 0)
    # What a column cannot hold is clamped, what is not a count is 0: a batch insert must not
    # fail forever on one upstream's odd report.
    odd = {"prompt_tokens": 10**30, "completion_tokens": -3, "images": "2", "pixels": 10**30, "steps": True}
    assert _tokens(odd) == (2**31 - 1, 0) and _images(odd) == (0, 2**63 - 1, 0)


def _record(endpoint: str, images: int, status: int = 200, **extra: object) -> Usage:
    fields: dict[str, object] = {
        "at": NOW,
        "key_id": 1,
        "user": "alice",
        "team": None,
        "model": "painter",
        "endpoint": endpoint,
        "prompt_tokens": 3,
        "completion_tokens": 0,
        "latency_ms": 1.0,
        "status": status,
        "cache_hit": False,
        "images": images,
        "pixels": images * 64,
        "steps": images * 10,
        **extra,
    }
    return Usage(**fields)  # type: ignore[arg-type]


def test_reports_and_budgets_count_images(database_url: str) -> None:
    url = database_url
    migrate(url)
    db = Database(url)
    try:
        store = UsageStore(db)
        store.insert(
            [
                _record(IMAGE_ENDPOINT, 3),
                _record(IMAGE_ENDPOINT, 0),  # an upstream that does not report images: counts 1
                _record(IMAGE_ENDPOINT, 5, status=502),  # failed: no image reached the client
                _record("chat", 0, model="talker"),
            ]
        )
        report = store.report("model")
        totals = report["totals"]
        assert (totals["requests"], totals["images"], totals["pixels"], totals["steps"]) == (4, 8, 512, 80)
        by_model = {row["model"]: row for row in report["data"]}
        assert by_model["painter"]["images"] == 8 and by_model["talker"]["images"] == 0
        assert period_usage(db, "key:1", NOW - timedelta(days=1)) == (9, 4)
        assert period_usage(db, "user:alice", NOW + timedelta(days=1)) == (0, 0)
    finally:
        db.dispose()
