"""Usage records: batched inserts from the gateway's meter, and aggregate reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, Integer, cast, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ColumnElement

from budrt.store.database import Database, as_utc
from budrt.store.tables import UsageRecord

GroupBy = Literal["user", "team", "model", "key"]


@dataclass(frozen=True, slots=True)
class Usage:
    """One request, as the gateway saw it."""

    at: datetime
    key_id: int | None
    user: str | None
    team: str | None
    model: str | None
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    status: int
    cache_hit: bool
    request_id: str | None = None  # unique; a record inserted again (spool replay) is skipped
    images: int = 0  # image requests: images made, their pixels, their denoising steps
    pixels: int = 0
    steps: int = 0
    ttft_ms: float | None = None  # first byte of the answer; None from gateways before it was kept


_GROUP_COLUMNS = {
    "user": UsageRecord.user,
    "team": UsageRecord.team,
    "model": UsageRecord.model,
    "key": UsageRecord.key_id,
}


class UsageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def insert(self, records: Sequence[Usage]) -> None:
        """One transaction, one executemany for the whole batch; ids already present are skipped."""
        if not records:
            return
        rows = [
            {
                "at": r.at,
                "key_id": r.key_id,
                "user": r.user,
                "team": r.team,
                "model": r.model,
                "endpoint": r.endpoint,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "latency_ms": r.latency_ms,
                "status": r.status,
                "cache_hit": r.cache_hit,
                "request_id": r.request_id,
                "images": r.images,
                "pixels": r.pixels,
                "steps": r.steps,
                "ttft_ms": r.ttft_ms,
            }
            for r in records
        ]
        with self.db.writer.begin() as conn:
            _insert_new(conn, rows)

    def count(self) -> int:
        with self.db.session() as session:
            return session.scalar(select(func.count()).select_from(UsageRecord)) or 0

    def report(
        self,
        group_by: GroupBy,
        *,
        key_id: int | None = None,
        user: str | None = None,
        team: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> dict[str, Any]:
        """Totals and per-group sums over [start, end), filtered by key, user and team."""
        filters = _filters(key_id=key_id, user=user, team=team, start=start, end=end)
        group = _GROUP_COLUMNS[group_by]
        sums = (
            func.count(),
            func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
            func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
            func.coalesce(func.sum(cast(UsageRecord.cache_hit, Integer)), 0),
            func.coalesce(func.sum(UsageRecord.images), 0),
            func.coalesce(func.sum(UsageRecord.pixels), 0),
            func.coalesce(func.sum(UsageRecord.steps), 0),
        )
        query = select(group, *sums).where(*filters).group_by(group).order_by(group)
        rows = self.db.read(lambda session: [_sums(r[1:]) | {group_by: r[0]} for r in session.execute(query)])
        totals = _sums((0,) * len(sums))
        for row in rows:
            for name in totals:
                totals[name] += row[name]
        return {"totals": totals, "data": rows}

    def series(
        self,
        group_by: GroupBy,
        bucket_s: int,
        start: datetime,
        end: datetime,
        *,
        key_id: int | None = None,
        user: str | None = None,
        team: str | None = None,
    ) -> list[dict[str, Any]]:
        """Per time bucket and group over [start, end): requests, errors (status >= 400), tokens,
        images, and p50/p95 of latency and time to first byte. Percentiles need the rows, so
        they are read (newest first, at most SERIES_MAX_ROWS) and bucketed here, alike on every
        database, rather than in dialect-specific SQL."""
        group = _GROUP_COLUMNS[group_by]
        columns = (
            UsageRecord.at,
            group,
            UsageRecord.status,
            UsageRecord.prompt_tokens,
            UsageRecord.completion_tokens,
            UsageRecord.images,
            UsageRecord.latency_ms,
            UsageRecord.ttft_ms,
        )
        filters = _filters(key_id=key_id, user=user, team=team, start=start, end=end)
        query = select(*columns).where(*filters).order_by(UsageRecord.at.desc()).limit(SERIES_MAX_ROWS)
        rows = self.db.read(lambda session: session.execute(query).all())
        return bucket_rows(rows, start, bucket_s)


SERIES_MAX_ROWS = 500_000  # a series reads the newest rows of its range up to this many


def _insert_new(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert `rows`, skipping those whose request_id is already stored (exactly once)."""
    dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(conn.dialect.name)
    if dialect is not None:
        stmt = dialect.insert(UsageRecord).on_conflict_do_nothing(index_elements=["request_id"])
        conn.execute(stmt, rows)
        return
    ids = [r["request_id"] for r in rows if r["request_id"] is not None]
    if ids:  # other databases: look first (one gateway replays a segment at a time)
        present = set(conn.scalars(select(UsageRecord.request_id).where(UsageRecord.request_id.in_(ids))))
        rows = [r for r in rows if r["request_id"] not in present]
    if rows:
        conn.execute(insert(UsageRecord), rows)


def _sums(row: Sequence[Any]) -> dict[str, int]:
    requests, prompt, completion, hits, images, pixels, steps = (int(v or 0) for v in row)
    return {
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cache_hits": hits,
        "images": images,
        "pixels": pixels,
        "steps": steps,
    }


def _filters(
    *,
    key_id: int | None,
    user: str | None,
    team: str | None,
    start: datetime | None,
    end: datetime | None,
) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if key_id is not None:
        filters.append(UsageRecord.key_id == key_id)
    if user is not None:
        filters.append(UsageRecord.user == user)
    if team is not None:
        filters.append(UsageRecord.team == team)
    if start is not None:
        filters.append(UsageRecord.at >= start)
    if end is not None:
        filters.append(UsageRecord.at < end)
    return filters


def bucket_rows(rows: Sequence[Sequence[Any]], start: datetime, bucket_s: int) -> list[dict[str, Any]]:
    """(at, group, status, prompt, completion, images, latency_ms, ttft_ms) rows -> one point per
    (bucket, group) that has requests, ordered by bucket then group."""
    points: dict[tuple[int, Any], dict[str, Any]] = {}
    samples: dict[tuple[int, Any], tuple[list[float], list[float]]] = {}
    origin = as_utc(start).timestamp()
    for at, group, status, prompt, completion, images, latency, ttft in rows:
        bucket = int((as_utc(at).timestamp() - origin) // bucket_s)
        point = points.get((bucket, group))
        if point is None:
            point = points[(bucket, group)] = {
                "t": origin + bucket * bucket_s,
                "group": group,
                "requests": 0,
                "errors": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "images": 0,
            }
            samples[(bucket, group)] = ([], [])
        point["requests"] += 1
        point["errors"] += status >= 400
        point["prompt_tokens"] += prompt or 0
        point["completion_tokens"] += completion or 0
        point["images"] += images or 0
        latencies, ttfts = samples[(bucket, group)]
        latencies.append(latency)
        if ttft is not None:
            ttfts.append(ttft)
    for where, point in points.items():
        latencies, ttfts = samples[where]
        point |= {
            "latency_ms_p50": _quantile(latencies, 0.50),
            "latency_ms_p95": _quantile(latencies, 0.95),
            "ttft_ms_p50": _quantile(ttfts, 0.50),
            "ttft_ms_p95": _quantile(ttfts, 0.95),
        }
    return sorted(points.values(), key=lambda p: (p["t"], str(p["group"])))


def _quantile(values: list[float], q: float) -> float | None:
    """The nearest-rank quantile; None without values."""
    if not values:
        return None
    values.sort()
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)
