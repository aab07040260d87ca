"""usage_records.images, pixels, steps: what an image request produced

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0005"  # the usage_records branch
branch_labels = None
depends_on = None

COLUMNS = (("images", sa.Integer()), ("pixels", sa.BigInteger()), ("steps", sa.Integer()))


def upgrade() -> None:
    # NOT NULL with a server default: SQLite adds such a column without rebuilding the table, and
    # rows written before this revision (text and image requests alike) read 0.
    for name, kind in COLUMNS:
        op.add_column("usage_records", sa.Column(name, kind, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
