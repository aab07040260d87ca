"""Per-scope limits stored on keys, users and teams, and the usage that counts against budgets.

A `Quota` is what an admin sets (rates and per-period budgets); the gateway turns it into a
`budrt.gateway.ratelimit.Limit` for the scope. `period_usage` reads the usage records of the
current period so an in-process limiter can start where the last gateway process stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, select

from budrt.store.tables import UsageRecord

if TYPE_CHECKING:
    from budrt.store.database import Database

# Columns shared by api_keys (rpm/tpm predate the others), users and teams.
QUOTA_FIELDS = ("rpm", "tpm", "tokens_per_day", "tokens_per_month", "images_per_day", "images_per_month")
BUDGET_FIELDS = QUOTA_FIELDS[2:]
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
# The largest value each column holds (tables.py: Integer is 32-bit on PostgreSQL, BigInteger 64).
QUOTA_MAX = {
    "rpm": INT32_MAX,
    "tpm": INT32_MAX,
    "tokens_per_day": INT64_MAX,
    "tokens_per_month": INT64_MAX,
    "images_per_day": INT32_MAX,
    "images_per_month": INT32_MAX,
}
IMAGE_ENDPOINT = "image"  # the metering endpoint name of /v1/images/generations


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits of one key, user or team; None = unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    images_per_day: int | None = None
    images_per_month: int | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in QUOTA_FIELDS}


def quota_of(row: Any) -> Quota:
    """The quota columns of a table row (or any object with those attributes)."""
    return Quota(**{name: getattr(row, name, None) for name in QUOTA_FIELDS})


def check_quota(values: dict[str, Any]) -> dict[str, int | None]:
    """Validates quota fields from an admin request: positive integers, or None to clear."""
    out: dict[str, int | None] = {}
    for name, value in values.items():
        if name not in QUOTA_FIELDS:
            raise ValueError(f"unknown limit {name!r}")
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= QUOTA_MAX[name]
        ):
            raise ValueError(f"'{name}' must be an integer from 1 to {QUOTA_MAX[name]}, or null")
        out[name] = value
    return out


def period_usage(db: Database, scope: str, start: datetime) -> tuple[int, int]:
    """(tokens, images) recorded for `scope` ("key:12", "user:alice", "team:ml") since `start`.

    Counts successful requests not answered from the cache, as the limiter charges them.
    Images: those recorded (revision 0007), at least one per successful image request (an older
    row, or an upstream that does not report them, records 0).
    """
    kind, _, name = scope.partition(":")
    column = {"key": UsageRecord.key_id, "user": UsageRecord.user, "team": UsageRecord.team}.get(kind)
    if column is None or (kind == "key" and not name.isdigit()):
        return 0, 0
    value: int | str = int(name) if kind == "key" else name
    tokens = func.coalesce(func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens), 0)
    made = case((UsageRecord.images > 0, UsageRecord.images), else_=1)
    images = func.coalesce(func.sum(made).filter(UsageRecord.endpoint == IMAGE_ENDPOINT), 0)
    query = select(tokens, images).where(
        column == value,
        UsageRecord.at >= start,
        UsageRecord.status == 200,
        UsageRecord.cache_hit.is_(False),
    )
    row = db.read(lambda session: session.execute(query).one())
    return int(row[0] or 0), int(row[1] or 0)
