"""usage_records.request_id: the meter's unique id per request (spool replay inserts once)

Revision ID: 0005
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0002"  # needs the usage_records table
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column (SQLite adds it without rebuilding the table) and a unique index: rows
    # written before this revision keep NULL, which a unique index allows any number of times.
    op.add_column("usage_records", sa.Column("request_id", sa.String(40), nullable=True))
    op.create_index("ux_usage_request_id", "usage_records", ["request_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_usage_request_id", table_name="usage_records")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("request_id")
