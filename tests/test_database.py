"""The metadata database on SQLite and PostgreSQL: writes racing other writers, the stores'
round trips, and PostgreSQL read replicas chosen by health and lag (real primary and standby)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from budrt.config import Settings
from budrt.security import certs
from budrt.store.database import Database
from budrt.store.db import migrate
from budrt.store.identity import IdentityStore
from budrt.store.keys import KeyStore
from budrt.store.models import ModelStore
from budrt.store.objects import LocalObjectStore
from budrt.store.repository import ModelRepository
from budrt.store.usage import Usage, UsageStore
from tests.pg_server import PostgresServer, require_postgres

SECRET = b"s" * 32


def _usage(request_id: str) -> Usage:
    return Usage(datetime.now(UTC), 1, "alice", None, "m", "chat", 3, 4, 1.0, 200, False, request_id)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    migrate(database_url)
    database = Database(database_url)
    yield database
    database.dispose()


def test_read_then_write_transactions_wait_for_other_writers(db: Database) -> None:
    """Revoking and changing limits read, then write, in one transaction. On SQLite a deferred
    transaction fails at once ("database is locked") when another connection commits between
    its read and its write; write transactions take the lock first, so they wait instead."""
    keys, usage = KeyStore(db, SECRET), UsageStore(db)
    made = [keys.create(f"k{i}")[1] for i in range(40)]
    stop, errors = threading.Event(), []

    def meter() -> None:  # the gateway's meter, committing usage batches all the while
        n = 0
        while not stop.is_set():
            try:
                usage.insert([_usage(f"r{n}-{i}") for i in range(5)])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            n += 1

    writer = threading.Thread(target=meter)
    writer.start()
    try:
        for record in made:
            assert keys.update_limits(record.id, {"rpm": 7}) is not None
            assert keys.revoke(record.id) is not None
    finally:
        stop.set()
        writer.join()
    assert errors == []
    assert all(r.revoked_at is not None and r.rpm == 7 for r in keys.list())
    assert usage.count() > 0


def test_usage_rows_are_inserted_once(db: Database) -> None:
    usage = UsageStore(db)
    usage.insert([_usage("a"), _usage("b")])
    usage.insert([_usage("b"), _usage("c")])  # a spool segment replayed after a crash
    assert usage.count() == 3
    assert usage.report("model")["totals"]["requests"] == 3


def test_identity_changes_and_their_audit(db: Database) -> None:
    identity = IdentityStore(db)
    identity.create_team("ml", "admin", {"rpm": 10})
    identity.create_role("reader", ["models:read"], "admin")
    identity.create_user("alice", "ml", ["reader"], "admin")
    identity.update_user("alice", {"tpm": 500}, "admin")
    assert [(u["name"], u["team"], u["roles"], u["tpm"]) for u in identity.list_users()] == [
        ("alice", "ml", ["reader"], 500)
    ]
    user_id, team_id, _ = identity.user("alice")
    owner = identity.owner(user_id, None)
    assert (owner.user, owner.team, owner.roles) == ("alice", "ml", ("reader",))
    assert owner.team_quota is not None and owner.team_quota.rpm == 10
    actions = [e["action"] for e in identity.audit_log()]
    assert actions == ["users:update", "users:create", "roles:create", "teams:create"]


def test_model_records_round_trip(db: Database, tmp_path: Path) -> None:
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text('{"layers": 2}')
    repository_root = tmp_path / "repository"
    models = ModelStore(db, ModelRepository(LocalObjectStore(repository_root)), f"file://{repository_root}")
    pushed = models.push(str(source), "tiny", "chat", "safetensors", aliases=["small"])
    with pytest.raises(ValueError, match="already registered"):
        models.push(str(source), "tiny", "chat", "safetensors")
    models.set_deployments("tiny", ["text-0", "text-1"])
    found = models.get("small")
    assert found is not None and (found.digest, found.deployments) == (pushed.digest, ("text-0", "text-1"))
    assert [m.name for m in models.list()] == ["tiny"]
    assert models.remove("tiny") is not None and models.list() == []


# -- PostgreSQL primary and streaming replica ------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A primary and a streaming replica of it, both this test's own (it may stop or promote them)."""
    require_postgres()
    primary = PostgresServer().start()
    try:
        migrate(primary.url)
        replica = primary.replica()
        try:
            primary.wait_replayed(replica)
            yield primary, replica
        finally:
            replica.close()
    finally:
        primary.close()


@pytest.fixture
def routed(cluster: tuple[PostgresServer, PostgresServer]) -> Iterator[Database]:
    """A `Database` on the cluster's primary, its replica checked every 0.1 s."""
    primary, replica = cluster
    db = Database(primary.url, [replica.url], check_every_s=0.1)
    yield db
    db.dispose()


def _served_by_standby(db: Database) -> bool:
    return db.read(lambda session: session.execute(text("SELECT pg_is_in_recovery()")).scalar_one())


def _wait(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_reads_go_to_a_caught_up_replica_and_writes_to_the_primary(
    cluster: tuple[PostgresServer, PostgresServer],
    routed: Database,
) -> None:
    primary, replica = cluster
    db = routed
    assert db.replicas[0].healthy and db.replicas[0].lag_s == 0.0
    assert _served_by_standby(db)
    keys = KeyStore(db, SECRET)
    key, record = keys.create("fresh")
    # Not yet on the replica, perhaps: a key the replica does not know is asked of the primary.
    found = keys.verify(key)
    assert found is not None and found.id == record.id
    primary.wait_replayed(replica)
    assert [k.name for k in keys.list()] == ["fresh"]  # a listing, read on the replica


def test_a_lagging_replica_is_skipped_until_it_catches_up(
    cluster: tuple[PostgresServer, PostgresServer],
) -> None:
    primary, replica = cluster
    db = Database(primary.url, [replica.url], max_lag_s=0.3, check_every_s=0.1)
    pause = Database(replica.admin_url)  # replay control needs the superuser
    try:
        with pause.writer.begin() as conn:
            conn.execute(text("SELECT pg_wal_replay_pause()"))
        UsageStore(db).insert([_usage("while-paused")])
        _wait(lambda: db.replicas[0].lag_s > 0.3)
        assert db.replicas[0].healthy and not _served_by_standby(db)  # the primary answers
        assert UsageStore(db).report("model")["totals"]["requests"] == 1  # read your writes
        with pause.writer.begin() as conn:
            conn.execute(text("SELECT pg_wal_replay_resume()"))
        _wait(lambda: db.replicas[0].lag_s == 0.0)
        assert _served_by_standby(db)
    finally:
        pause.dispose()
        db.dispose()


def test_a_replica_down_moves_reads_to_the_primary(
    cluster: tuple[PostgresServer, PostgresServer], routed: Database
) -> None:
    primary, replica = cluster
    db = routed
    keys = KeyStore(db, SECRET)
    key, _ = keys.create("k")
    primary.wait_replayed(replica)
    assert _served_by_standby(db)
    replica.stop("immediate")
    # Before any check notices: the failed replica read is retried on the primary.
    assert keys.verify(key) is not None
    assert not db.replicas[0].healthy
    assert [k.name for k in keys.list()] == ["k"]
    replica.start()
    _wait(lambda: db.replicas[0].healthy)
    assert _served_by_standby(db)


def test_with_the_primary_down_reads_continue_on_the_replica_and_writes_fail(
    cluster: tuple[PostgresServer, PostgresServer],
    routed: Database,
) -> None:
    primary, replica = cluster
    db = routed
    keys = KeyStore(db, SECRET)
    key, _ = keys.create("k")
    primary.wait_replayed(replica)
    primary.stop("immediate")
    db.check()
    assert db.replicas[0].healthy  # measured against what it received: caught up
    assert keys.verify(key) is not None and _served_by_standby(db)
    with pytest.raises(OperationalError):
        keys.create("refused")
    primary.start()
    _wait(lambda: keys.create("again") is not None)


def test_a_promoted_replica_carries_on_as_the_primary(cluster: tuple[PostgresServer, PostgresServer]) -> None:
    primary, replica = cluster
    old = Database(primary.url, [replica.url], check_every_s=0.1)
    keys = KeyStore(old, SECRET)
    key, record = keys.create("before")
    UsageStore(old).insert([_usage("before")])
    primary.wait_replayed(replica)
    primary.stop("fast")
    replica.promote()
    old.check()
    assert not old.replicas[0].healthy  # no standby any more: never read as one
    old.dispose()

    migrate(replica.url)  # what a restarted gateway does first: nothing left to do
    new = Database(replica.url)
    try:
        keys = KeyStore(new, SECRET)
        found = keys.verify(key)
        assert found is not None and found.id == record.id
        assert keys.revoke(record.id) is not None
        _, made = keys.create("after")
        assert made.id > record.id
        usage = UsageStore(new)
        usage.insert([_usage("before"), _usage("after")])
        assert usage.count() == 2
    finally:
        new.dispose()


def test_postgresql_over_verified_tls(tmp_path: Path) -> None:
    """`sslmode=verify-full` in the URLs: the primary and the replica are reached over TLS with the
    platform's certificates; plain TCP, another CA and a name the certificate lacks are refused."""
    require_postgres()
    settings = Settings(home=tmp_path, tls={"hosts": ["127.0.0.1"]})  # not "localhost"
    paths = certs.init(settings.tls, tmp_path)
    with PostgresServer(tls=(paths.server_cert, paths.server_key)) as primary:
        replica = primary.replica()
        try:

            def verified(server: PostgresServer, ca: Path = paths.ca) -> str:
                return f"{server.url}?sslmode=verify-full&sslrootcert={ca}"

            migrate(verified(primary))
            db = Database(verified(primary), [verified(replica)])
            try:
                key, _ = KeyStore(db, SECRET).create("tls")
                primary.wait_replayed(replica)
                db.check()
                assert db.replicas[0].healthy and _served_by_standby(db)
                assert KeyStore(db, SECRET).verify(key) is not None
                on_tls = text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                assert db.read(lambda session: session.execute(on_tls).scalar_one()) is True
                with db.writes.begin() as session:
                    assert session.execute(on_tls).scalar_one() is True
            finally:
                db.dispose()
            other = certs.init(Settings(home=tmp_path / "other").tls, tmp_path / "other")
            refused = {  # URL: what libpq says
                f"{primary.url}?sslmode=disable": "no encryption",
                verified(primary, other.ca): "certificate verify failed",
                verified(primary).replace("@127.0.0.1:", "@localhost:"): "does not match host name",
            }
            for url, reason in refused.items():
                engine = create_engine(url)
                try:
                    with pytest.raises(OperationalError, match=reason), engine.connect():
                        pytest.fail(f"connected: {url}")
                finally:
                    engine.dispose()
        finally:
            replica.close()
