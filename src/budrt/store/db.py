"""Engine, sessions and schema migrations for the metadata database (SQLite or PostgreSQL)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from budrt.security.files import PRIVATE_DIR, private_file, touch_private

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("budrt.store")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_SQLITE_BUSY_MS = 10_000
_PG_CONNECT_TIMEOUT_S = 3
# Any constant works: it only has to be the same in every budrt process sharing a database.
_PG_MIGRATION_LOCK = 0x62756472
# Every branch's newest revision (`alembic heads`; a test compares them with the scripts). A
# database already at them is left alone without importing Alembic: ~0.1 s of every gateway's
# start (under `budrt serve` the supervisor has migrated it already).
HEADS = frozenset({"0003", "0004", "0006", "0008", "0009"})


def make_engine(url: str, *, immediate: bool = False) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and a busy timeout.

    `immediate=True` makes every SQLite transaction `BEGIN IMMEDIATE`: it takes the write lock
    at the start, waiting under the busy timeout. A deferred transaction that reads and then
    writes fails at once ("database is locked", whatever the timeout) when another connection
    committed in between; so every write transaction, and migrations, use this.
    """
    parsed = make_url(url)
    if not parsed.get_backend_name() == "sqlite":
        # A bounded connect: a primary or replica that does not answer fails the call quickly.
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": _PG_CONNECT_TIMEOUT_S})
    database = parsed.database
    if database and database != ":memory:" and not database.startswith("file:"):
        _private_sqlite(Path(database).expanduser())
    engine = create_engine(url, connect_args={"timeout": _SQLITE_BUSY_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin, so DDL is
        # transactional too (the sqlite3 module would run CREATE TABLE outside a transaction).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _private_sqlite(path: Path) -> None:
    """The DB holds key hashes and usage: 0600 before SQLite first opens it (its -wal and -shm
    then get the same mode from SQLite), and narrowed if it or they exist with wider modes."""
    path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    touch_private(path)
    for suffix in ("-wal", "-shm", "-journal"):
        private_file(path.with_name(path.name + suffix))


def at_heads(url: str) -> bool:
    """Whether the database at `url` is at `HEADS` already (False for a new one)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            revisions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except (OperationalError, ProgrammingError):  # no such table: never migrated
        return False
    finally:
        engine.dispose()
    return set(revisions) == HEADS


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: records are copied out after commit without a second query.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """A programmatic Alembic config (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, attempts: int = 5) -> None:
    """Bring the schema to the newest revision; safe to run at every start, from many processes."""
    if at_heads(url):
        return
    from alembic import command

    for attempt in range(1, attempts + 1):
        engine = make_engine(url, immediate=True)
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # Held until commit: a second process waits here, then finds nothing to do.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                cfg = alembic_config(url)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "heads")  # independent branches may add tables side by side
            return
        except (OperationalError, ProgrammingError) as exc:
            # A concurrent migrator can still win a race on a brand-new database (for example
            # while the journal mode is switched); its work is visible on the next try.
            if attempt == attempts:
                raise
            log.warning("migration attempt failed; retrying", extra={"fields": {"error": str(exc)}})
            time.sleep(0.2 * attempt)
        finally:
            engine.dispose()
