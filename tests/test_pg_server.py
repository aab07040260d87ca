"""The PostgreSQL harness: a replica follows its primary, refuses writes, and takes over once promoted."""

from __future__ import annotations

import time

import pytest
import sqlalchemy
from sqlalchemy.exc import DBAPIError, ProgrammingError

from tests.pg_server import PostgresServer, require_postgres

require_postgres()


def _execute(url: str, statement: str) -> list[tuple]:
    # A fresh engine each time and disposed: no pooled connection outlives a server stop.
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(sqlalchemy.text(statement))
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _wait_for_ids(url: str, expected: list[tuple], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := _ids(url)) != expected:
        assert time.monotonic() < deadline, f"replica still sees {seen}, not {expected}"
        time.sleep(0.05)


def _ids(url: str) -> list[tuple] | str:
    """The rows of `t`, or why there are none yet: a replica that has not replayed the CREATE
    TABLE has no `t` (CI once queried it that early)."""
    try:
        return _execute(url, "SELECT id FROM t ORDER BY id")
    except ProgrammingError as exc:
        return f"no table yet ({type(exc.orig).__name__})"


def test_replica_follows_refuses_writes_and_takes_over_when_promoted() -> None:
    with PostgresServer() as primary, primary.replica() as replica:
        assert replica.port != primary.port and replica.url != primary.url
        _execute(primary.url, "CREATE TABLE t (id int PRIMARY KEY)")
        _execute(primary.url, "INSERT INTO t VALUES (1)")
        _wait_for_ids(replica.url, [(1,)])
        with pytest.raises(DBAPIError, match="read-only"):
            _execute(replica.url, "INSERT INTO t VALUES (2)")

        primary.stop()
        replica.promote()
        _execute(replica.url, "INSERT INTO t VALUES (2)")
        assert _execute(replica.url, "SELECT id FROM t ORDER BY id") == [(1,), (2,)]
