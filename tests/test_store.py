"""Schema migrations on a fresh database, SQLite and PostgreSQL (the `database_url` fixture)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from budrt.store.db import HEADS, alembic_config, at_heads, make_engine, migrate


def _heads() -> list[str]:
    """Every branch's newest revision: what `migrate` upgrades to."""
    return sorted(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def test_migrate_creates_tables(database_url: str) -> None:
    url = database_url
    migrate(url)
    engine = make_engine(url)
    try:
        insp = inspect(engine)
        assert {"api_keys", "alembic_version"} <= set(insp.get_table_names())
        columns = {c["name"] for c in insp.get_columns("api_keys")}
        assert columns >= {  # later revisions add columns (0002: user_id, team_id, permissions)
            "id",
            "name",
            "prefix",
            "key_hash",
            "role",
            "models",
            "rpm",
            "tpm",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
        }
        unique = [i for i in insp.get_indexes("api_keys") if i["unique"]]
        assert [i["column_names"] for i in unique] == [["key_hash"]]
        # A key's role is any role name (64 characters); PostgreSQL enforces the declared length.
        role = next(c for c in insp.get_columns("api_keys") if c["name"] == "role")
        assert role["type"].length == 64
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
                assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


def test_migrate_is_idempotent(database_url: str) -> None:
    url = database_url
    migrate(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO api_keys (name, prefix, key_hash, role, created_at) "
                "VALUES ('k', 'p', 'h', 'user', '2024-01-01 00:00:00')"
            )
        )
    migrate(url)
    migrate(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM api_keys")).scalar() == 1
        assert sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()) == _heads()
    engine.dispose()


def test_a_database_at_the_heads_is_left_alone_without_alembic(database_url: str) -> None:
    """`HEADS` names the scripts' heads; a start whose database is at them imports no Alembic
    (~0.1 s of each gateway's start); any other revision is not taken for them."""
    assert sorted(HEADS) == _heads()
    assert not at_heads(database_url)  # new: no alembic_version table
    migrate(database_url)
    assert at_heads(database_url)
    code = (
        f"import sys; from budrt.store.db import migrate; migrate({database_url!r}); "
        "assert 'alembic' not in sys.modules, 'alembic imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    engine = make_engine(database_url, immediate=True)
    with engine.begin() as conn:  # a branch named a revision behind its head: not at the heads
        conn.execute(text("UPDATE alembic_version SET version_num = '0007' WHERE version_num = '0008'"))
    engine.dispose()
    assert not at_heads(database_url)


def test_migrate_makes_the_sqlite_directory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'budrt.db'}"
    migrate(url)
    assert (tmp_path / "sub" / "budrt.db").is_file()


def test_concurrent_migrations(database_url: str) -> None:
    url = database_url
    code = f"from budrt.store.db import migrate; migrate({url!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    engine = make_engine(url)
    with engine.connect() as conn:
        assert sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()) == _heads()
    engine.dispose()
