"""Usage records: batched inserts from the gateway's meter, and aggregate reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, Engine, Integer, cast, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ColumnElement

from budrt.store.db import session_factory
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


class UsageStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = session_factory(engine)

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
            }
            for r in records
        ]
        with self.engine.begin() as conn:
            _insert_new(conn, rows)

    def count(self) -> int:
        with self._sessions() as session:
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
        group = {
            "user": UsageRecord.user,
            "team": UsageRecord.team,
            "model": UsageRecord.model,
            "key": UsageRecord.key_id,
        }[group_by]
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
        with self._sessions() as session:
            rows = [_sums(row[1:]) | {group_by: row[0]} for row in session.execute(query)]
        totals = _sums((0,) * len(sums))
        for row in rows:
            for name in totals:
                totals[name] += row[name]
        return {"totals": totals, "data": rows}


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
