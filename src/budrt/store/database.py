"""The metadata database: one primary for writes, read replicas chosen by health and lag.

Writes and reads that must see them (read-your-writes) go to the primary. Reads that can be a
few seconds old (key lookups on a cache miss, listings, usage reports) go to a replica that
answered the last check and is at most `max_lag_s` behind, else to the primary. A read that
fails on a replica is tried again on the next candidate, the primary last.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from budrt.store.db import make_engine, session_factory

if TYPE_CHECKING:
    from budrt.config import Settings

log = logging.getLogger("budrt.store")

T = TypeVar("T")

# On the primary: where its WAL ends now. On a replica: whether it is still a standby, how many
# bytes of that WAL (or, the primary unknown, of what it received) it has not replayed, and the
# age of the last transaction it replayed.
_PRIMARY_LSN = text("SELECT pg_current_wal_lsn()::text")
_REPLICA_STATE = text(
    "SELECT pg_is_in_recovery(), "
    "pg_wal_lsn_diff(COALESCE(CAST(:primary_lsn AS pg_lsn), pg_last_wal_receive_lsn()), "
    "pg_last_wal_replay_lsn()), "
    "EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())"
)


@dataclass
class Replica:
    """One read replica and what its last check found."""

    url: str
    engine: Engine
    healthy: bool = False
    lag_s: float = float("inf")
    checked_at: float = 0.0  # monotonic


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` says the database cannot be reached or used right now (down, restarting,
    locked), as opposed to a bad statement or a broken constraint."""
    if not isinstance(exc, DBAPIError):
        return False
    return exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError))


class Database:
    """The primary's engines and the replicas'; see the module docstring for the routing rule."""

    def __init__(
        self,
        url: str,
        replica_urls: Sequence[str] = (),
        *,
        max_lag_s: float = 5.0,
        check_every_s: float = 1.0,
    ) -> None:
        self.url = url
        self.max_lag_s = max_lag_s
        self.check_every_s = check_every_s
        # SQLite: writes BEGIN IMMEDIATE (a write lock taken at the start, waited for under the
        # busy timeout), reads a deferred BEGIN. PostgreSQL needs no such split.
        self.writer = make_engine(url, immediate=True)
        self.primary = make_engine(url) if self.writer.dialect.name == "sqlite" else self.writer
        self.writes: sessionmaker[Session] = session_factory(self.writer)  # `with db.writes.begin()`
        self.replicas = [Replica(u, make_engine(u)) for u in replica_urls]
        self._turn = itertools.count()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        if self.replicas:
            self.check()  # the first reads already know which replicas answer
            self._monitor = threading.Thread(target=self._watch, name="budrt-db-replicas", daemon=True)
            self._monitor.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(
            settings.database_url_resolved,
            [u.get_secret_value() for u in settings.database_replica_urls],
            max_lag_s=settings.database_replica_max_lag_s,
        )

    def read(self, query: Callable[[Session], T]) -> T:
        """`query` run in a read-only session on the first usable candidate (see `candidates`)."""
        candidates = self.candidates()
        for i, engine in enumerate(candidates):
            try:
                with Session(engine, expire_on_commit=False) as session:
                    return query(session)
            except DBAPIError as exc:
                if i == len(candidates) - 1 or not is_unavailable(exc):
                    raise
                self._mark_down(engine, exc)
        raise AssertionError("unreachable: the primary is always a candidate")

    def session(self) -> Session:
        """A session on the primary, for reads that must see this process's own writes."""
        return Session(self.primary, expire_on_commit=False)

    def candidates(self) -> list[Engine]:
        """Usable replicas (healthy, within the lag bound), in turn, then the primary."""
        usable = [r.engine for r in self.replicas if r.healthy and r.lag_s <= self.max_lag_s]
        if usable:
            start = next(self._turn) % len(usable)
            usable = usable[start:] + usable[:start]
        return [*usable, self.primary]

    def check(self) -> None:
        """Measure every replica's health and lag now (the monitor thread does this each second)."""
        primary_lsn = self._primary_lsn()
        for replica in self.replicas:
            _check_replica(replica, primary_lsn)

    def _primary_lsn(self) -> str | None:
        try:
            with self.primary.connect() as conn:
                return conn.execute(_PRIMARY_LSN).scalar_one()
        except DBAPIError:
            return None  # the primary is down: replicas are measured against what they received

    def _watch(self) -> None:
        while not self._stop.wait(self.check_every_s):
            self.check()

    def _mark_down(self, engine: Engine, exc: BaseException) -> None:
        for replica in self.replicas:
            if replica.engine is engine:
                replica.healthy = False
                log.warning("replica read failed; using the next", extra={"fields": {"error": str(exc)}})

    def dispose(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        for engine in {self.writer, self.primary, *(r.engine for r in self.replicas)}:
            engine.dispose()


def _check_replica(replica: Replica, primary_lsn: str | None) -> None:
    was_healthy = replica.healthy
    try:
        with replica.engine.connect() as conn:
            standby, behind_bytes, age_s = conn.execute(_REPLICA_STATE, {"primary_lsn": primary_lsn}).one()
    except DBAPIError as exc:
        replica.healthy, replica.lag_s = False, float("inf")
        if was_healthy:
            log.warning("replica down", extra={"fields": {"replica": _host(replica.url), "error": str(exc)}})
        return
    replica.checked_at = time.monotonic()
    # A server that left recovery was promoted: it is no copy of this primary any more.
    replica.healthy = bool(standby)
    caught_up = behind_bytes is not None and behind_bytes <= 0
    replica.lag_s = 0.0 if caught_up else float(age_s if age_s is not None else "inf")
    fields = {"fields": {"replica": _host(replica.url)}}
    if replica.healthy and not was_healthy:
        log.info("replica up", extra=fields)
    elif was_healthy and not replica.healthy:
        log.warning("replica is no longer a standby (promoted?); not read", extra=fields)


def _host(url: str) -> str:
    return url.rpartition("@")[2]  # never log the password


def as_utc(value: datetime) -> datetime:
    """`value` with its zone: SQLite drops it, and every timestamp budrt writes is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)
