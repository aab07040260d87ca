"""Alembic environment: runs on the connection `budrt.store.db.migrate` passes in."""

from __future__ import annotations

from alembic import context

from budrt.store.tables import Base

config = context.config
target_metadata = Base.metadata


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        # Plain `alembic -x` use without budrt: open our own engine.
        from budrt.store.db import make_engine

        engine = make_engine(config.get_main_option("sqlalchemy.url"), immediate=True)
        with engine.begin() as conn:
            _run(conn)
        engine.dispose()
        return
    _run(connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER needs batch mode
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `budrt` against the database")
run_online()
