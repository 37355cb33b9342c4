"""blind jobs: status answers whose spend cannot be read, counted; why and since when a job is blind

Revision ID: 0007_blind
Revises: 0006_keep_results
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_blind"
down_revision = "0006_keep_results"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unreadable_count", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("blind_reason", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("blind_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("count_source", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("count_source")
        batch_op.drop_column("blind_since")
        batch_op.drop_column("blind_reason")
        batch_op.drop_column("unreadable_count")
