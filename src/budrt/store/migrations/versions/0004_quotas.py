"""quotas: rpm/tpm and per-period budgets on users and teams, budgets on api_keys

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"  # needs the users and teams tables
branch_labels = None
depends_on = None

BUDGETS = (
    ("tokens_per_day", sa.BigInteger()),
    ("tokens_per_month", sa.BigInteger()),
    ("images_per_day", sa.Integer()),
    ("images_per_month", sa.Integer()),
)
RATES = (("rpm", sa.Integer()), ("tpm", sa.Integer()))


def upgrade() -> None:
    # Nullable columns without defaults: SQLite adds them without rebuilding the tables.
    for name, kind in BUDGETS:
        op.add_column("api_keys", sa.Column(name, kind, nullable=True))
    for table in ("users", "teams"):
        for name, kind in RATES + BUDGETS:
            op.add_column(table, sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    for table in ("users", "teams"):
        with op.batch_alter_table(table) as batch:
            for name, _ in RATES + BUDGETS:
                batch.drop_column(name)
    with op.batch_alter_table("api_keys") as batch:
        for name, _ in BUDGETS:
            batch.drop_column(name)
