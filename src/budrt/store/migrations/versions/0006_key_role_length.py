"""api_keys.role holds any role name (up to 64 characters, as `rbac.ROLE_NAME` allows)

Revision ID: 0006
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0001"  # needs the api_keys table
branch_labels = None
depends_on = None


def upgrade() -> None:
    # String(16) held the built-in names only: PostgreSQL refused a key of a longer custom role
    # (a 500), SQLite stored it anyway. Batch mode: SQLite rebuilds the table to change the type.
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("role", existing_type=sa.String(16), type_=sa.String(64))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("role", existing_type=sa.String(64), type_=sa.String(16))
